//! Bad inputs: every kernel returns the documented `kfac_kernels::Error`
//! variant and leaves its outputs bit-for-bit untouched (matrix entries,
//! the padding of strided outputs, slices and scalars passed by `&mut`).

#[macro_use]
mod common;

use common::*;
use faer::dyn_stack::{MemStack, StackReq};
use faer::{Mat, MatRef, Par};
use kfac_kernels::conv::{
    conv2d_a_update, conv2d_a_update_scratch, conv2d_g_update, Conv2dGeometry, ConvNormalization,
    ImageRef,
};
use kfac_kernels::eigen::{
    eigen_inverse_denominators, precondition_eigen, precondition_eigen_precomputed,
    precondition_eigen_scratch, sym_eigen, sym_eigen_scratch,
};
use kfac_kernels::factor::{
    materialize_lazy, mirror_lower, running_average, running_average_lazy, syrk_update,
    syrk_update_scratch,
};
use kfac_kernels::inverse::{
    damped_inverse, damped_inverse_scratch, factored_damping, precondition_inverse,
    precondition_inverse_scratch, tikhonov_pi,
};
use kfac_kernels::kl::{frobenius_dot, kl_clip_scale};
use kfac_kernels::kron::{
    kron, kron_apply, kron_apply_scratch, kron_damped_solve, kron_damped_solve_scratch,
};
use kfac_kernels::packed::{
    accumulate_packed, add_packed_to_lower, bf16, bf16_to_f32, f16, f16_to_f32, f32_to_bf16,
    f32_to_f16, pack_lower, unpack_lower,
};
use kfac_kernels::Error;
use proptest::prelude::*;

/// Asserts that `$r` is `Err` matching `$pat`.
macro_rules! assert_err {
    ($r:expr, $pat:pat) => {
        match $r {
            Err($pat) => {}
            other => panic!(
                "expected Err({}), got {:?} at {}:{}",
                stringify!($pat),
                other,
                file!(),
                line!()
            ),
        }
    };
}

const SEQ: Par = Par::Seq;

/// A strided output with random entries and sentinel padding.
fn output<T: Flt>(r: usize, c: usize, seed: u64) -> Stored<T> {
    let m = Gen::new(seed).matrix(r, c);
    Stored::from_m(&m, Layout::ColStrided(2), T::from_f64(-77.625))
}

fn input<T: Flt>(r: usize, c: usize, seed: u64) -> Stored<T> {
    let m = Gen::new(seed).matrix(r, c);
    Stored::from_m(&m, Layout::RowMajor, T::from_f64(f64::NAN))
}

fn slice_bits<T: Flt>(s: &[T]) -> Vec<u64> {
    s.iter().map(|v| v.bits()).collect()
}

/// A buffer that is too small for `req` (half of it, possibly 0 bytes).
fn small_buffer(req: StackReq) -> faer::dyn_stack::MemBuffer {
    let bytes = req.unaligned_bytes_required() / 2;
    faer::dyn_stack::MemBuffer::new(StackReq::new::<u8>(bytes))
}

fn non_finite<T: Flt>(k: u8) -> T {
    T::from_f64([f64::NAN, f64::INFINITY, f64::NEG_INFINITY][k as usize % 3])
}

// ---------------------------------------------------------------------------
// factor
// ---------------------------------------------------------------------------

fn factor_errors<T: Flt>() {
    let (n, d) = (5, 3);
    let x = input::<T>(n, d, 1);
    let mut buf = buffer(syrk_update_scratch::<T>(n, d, true, SEQ));

    // C of the wrong size: d x d instead of (d + 1) x (d + 1) with a bias.
    let mut c = output::<T>(d, d, 2);
    let before = c.bits();
    assert_err!(
        syrk_update(
            c.view_mut(),
            T::ONE,
            T::ONE,
            x.view(),
            true,
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::DimensionMismatch {
            expected: (4, 4),
            found: (3, 3),
            ..
        }
    );
    assert_eq!(c.bits(), before);

    let mut c = output::<T>(d + 1, d + 1, 3);
    let before = c.bits();
    // Non-finite alpha / beta.
    for bad in [f64::NAN, f64::INFINITY] {
        assert_err!(
            syrk_update(
                c.view_mut(),
                T::from_f64(bad),
                T::ONE,
                x.view(),
                true,
                SEQ,
                MemStack::new(&mut buf)
            ),
            Error::InvalidParameter { .. }
        );
        assert_err!(
            syrk_update(
                c.view_mut(),
                T::ONE,
                T::from_f64(bad),
                x.view(),
                true,
                SEQ,
                MemStack::new(&mut buf)
            ),
            Error::InvalidParameter { .. }
        );
    }
    // Scratch too small (the bias row needs a vector of n ones).
    let mut small = small_buffer(syrk_update_scratch::<T>(n, d, true, SEQ));
    assert_err!(
        syrk_update(
            c.view_mut(),
            T::ONE,
            T::ONE,
            x.view(),
            true,
            SEQ,
            MemStack::new(&mut small)
        ),
        Error::ScratchTooSmall { .. }
    );
    assert_err!(
        running_average(
            c.view_mut(),
            T::from_f64(0.5),
            x.view(),
            true,
            SEQ,
            MemStack::new(&mut small)
        ),
        Error::ScratchTooSmall { .. }
    );
    // xi outside [0, 1].
    for xi in [-0.1, 1.1, -1e-30, 1.0 + 1e-6, f64::NAN, f64::INFINITY] {
        assert_err!(
            running_average(
                c.view_mut(),
                T::from_f64(xi),
                x.view(),
                true,
                SEQ,
                MemStack::new(&mut buf)
            ),
            Error::InvalidParameter { .. }
        );
    }
    // A mean over no samples.
    let empty = Mat::<T>::zeros(0, d);
    assert_err!(
        running_average(
            c.view_mut(),
            T::from_f64(0.5),
            empty.as_ref(),
            true,
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::InvalidParameter { .. }
    );
    assert_eq!(c.bits(), before);

    // Lazy: bad xi, bad scale, empty batch, wrong shape, too small a stack;
    // C and the scale untouched.
    let mut scale = T::from_f64(0.75);
    for xi in [-0.5, 2.0, f64::NAN] {
        assert_err!(
            running_average_lazy(
                c.view_mut(),
                &mut scale,
                T::from_f64(xi),
                x.view(),
                true,
                SEQ,
                MemStack::new(&mut buf)
            ),
            Error::InvalidParameter { .. }
        );
    }
    for bad_scale in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let mut s = T::from_f64(bad_scale);
        assert_err!(
            running_average_lazy(
                c.view_mut(),
                &mut s,
                T::from_f64(0.5),
                x.view(),
                true,
                SEQ,
                MemStack::new(&mut buf)
            ),
            Error::InvalidParameter { .. }
        );
        assert_eq!(s.bits(), T::from_f64(bad_scale).bits());
    }
    assert_err!(
        running_average_lazy(
            c.view_mut(),
            &mut scale,
            T::from_f64(0.5),
            empty.as_ref(),
            true,
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::InvalidParameter { .. }
    );
    assert_err!(
        running_average_lazy(
            c.view_mut(),
            &mut scale,
            T::from_f64(0.5),
            x.view(),
            false,
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::DimensionMismatch { .. }
    );
    assert_err!(
        running_average_lazy(
            c.view_mut(),
            &mut scale,
            T::from_f64(0.5),
            x.view(),
            true,
            SEQ,
            MemStack::new(&mut small)
        ),
        Error::ScratchTooSmall { .. }
    );
    assert_eq!(scale.bits(), T::from_f64(0.75).bits());
    assert_eq!(c.bits(), before);

    // materialize_lazy: bad scale, non-square.
    for bad_scale in [0.0, -2.0, f64::NAN, f64::NEG_INFINITY] {
        let mut s = T::from_f64(bad_scale);
        assert_err!(
            materialize_lazy(c.view_mut(), &mut s),
            Error::InvalidParameter { .. }
        );
        assert_eq!(s.bits(), T::from_f64(bad_scale).bits());
    }
    let mut rect = output::<T>(3, 4, 4);
    let rect_before = rect.bits();
    let mut s = T::from_f64(0.5);
    assert_err!(
        materialize_lazy(rect.view_mut(), &mut s),
        Error::DimensionMismatch { .. }
    );
    assert_eq!(s.bits(), T::from_f64(0.5).bits());
    // mirror_lower: non-square.
    assert_err!(
        mirror_lower(rect.view_mut()),
        Error::DimensionMismatch { .. }
    );
    assert_eq!(rect.bits(), rect_before);
    assert_eq!(c.bits(), before);
}

#[test]
fn factor_updates_reject_bad_arguments_and_leave_outputs_untouched() {
    factor_errors::<f32>();
    factor_errors::<f64>();
}

#[derive(Clone, Debug)]
struct NonFiniteCase {
    n: usize,
    d: usize,
    i: usize,
    j: usize,
    which: u8,
    layout: Layout,
    bias: bool,
    lazy: bool,
}

fn non_finite_case() -> impl Strategy<Value = NonFiniteCase> {
    (
        1usize..=12,
        1usize..=12,
        any::<u8>(),
        layout(),
        any::<bool>(),
    )
        .prop_flat_map(|(n, d, which, layout, bias)| {
            (0..n, 0..d, any::<bool>()).prop_map(move |(i, j, lazy)| NonFiniteCase {
                n,
                d,
                i,
                j,
                which,
                layout,
                bias,
                lazy,
            })
        })
}

fn check_syrk_non_finite<T: Flt>(case: &NonFiniteCase) -> Result<(), TestCaseError> {
    let NonFiniteCase { n, d, i, j, .. } = *case;
    let mut x = Stored::<T>::from_m(&Gen::new(7).matrix(n, d), case.layout, T::ZERO);
    x.set(i, j, non_finite::<T>(case.which));
    let dim = d + case.bias as usize;
    let mut c = output::<T>(dim, dim, 8);
    let before = c.bits();
    let mut buf = buffer(syrk_update_scratch::<T>(n, d, case.bias, SEQ));
    let r = if case.lazy {
        let mut s = T::from_f64(0.5);
        let r = running_average_lazy(
            c.view_mut(),
            &mut s,
            T::from_f64(0.9),
            x.view(),
            case.bias,
            SEQ,
            MemStack::new(&mut buf),
        );
        prop_assert_eq!(s, T::from_f64(0.5));
        r
    } else {
        syrk_update(
            c.view_mut(),
            T::ONE,
            T::ONE,
            x.view(),
            case.bias,
            SEQ,
            MemStack::new(&mut buf),
        )
    };
    prop_assert!(
        matches!(r, Err(Error::NonFinite { row, col, .. }) if row == i && col == j),
        "expected NonFinite at ({}, {}), got {:?}",
        i,
        j,
        r
    );
    prop_assert_eq!(c.bits(), before);
    Ok(())
}

both_types!(
    factor_updates_reject_non_finite_activations_at_their_position,
    non_finite_case(),
    check_syrk_non_finite
);

// ---------------------------------------------------------------------------
// conv
// ---------------------------------------------------------------------------

fn conv_errors<T: Flt>() {
    let (n, c, h, w) = (2, 2, 5, 4);
    let data: Vec<T> = (0..n * c * h * w)
        .map(|v| T::from_f64((v % 7) as f64 - 3.0))
        .collect();
    let img = ImageRef::nchw(&data, n, c, h, w).unwrap();
    let good = Conv2dGeometry::new(n, c, h, w, 3, 2);
    let k = c * 3 * 2 + 1;
    let mut a = output::<T>(k, k, 9);
    let before = a.bits();
    let mut buf = buffer(conv2d_a_update_scratch::<T>(&good, true).unwrap());
    let run = |a: &mut Stored<T>,
               img: ImageRef<'_, T>,
               geom: &Conv2dGeometry,
               buf: &mut faer::dyn_stack::MemBuffer| {
        conv2d_a_update(
            a.view_mut(),
            T::ONE,
            T::ONE,
            img,
            geom,
            true,
            ConvNormalization::Kfc,
            SEQ,
            MemStack::new(buf),
        )
    };

    // Bad geometries: zero stride / kernel / dilation, dilated kernel larger
    // than the padded input. The scratch query refuses them too.
    let bad_geoms = [
        good.stride(0, 1),
        good.stride(1, 0),
        Conv2dGeometry::new(n, c, h, w, 0, 2),
        Conv2dGeometry::new(n, c, h, w, 3, 0),
        good.dilation(0, 1),
        good.dilation(1, 0),
        Conv2dGeometry::new(n, c, h, w, h + 1, 2),
        Conv2dGeometry::new(n, c, h, w, 3, w + 3).padding(0, 1),
        good.dilation(3, 1),
    ];
    for geom in &bad_geoms {
        assert_err!(
            conv2d_a_update_scratch::<T>(geom, true),
            Error::InvalidGeometry { .. }
        );
        assert_err!(
            run(&mut a, img, geom, &mut buf),
            Error::InvalidGeometry { .. }
        );
    }
    // A large enough kernel once padded is fine.
    assert!(Conv2dGeometry::new(n, c, h, w, h + 2, 2)
        .padding(1, 0)
        .output_size()
        .is_ok());
    // Input dims differing from the geometry's.
    for geom in [
        Conv2dGeometry::new(n + 1, c, h, w, 3, 2),
        Conv2dGeometry::new(n, c + 1, h, w, 3, 2),
        Conv2dGeometry::new(n, c, h - 1, w, 3, 2),
        Conv2dGeometry::new(n, c, h, w + 1, 3, 2),
    ] {
        let mut buf = buffer(conv2d_a_update_scratch::<T>(&geom, true).unwrap());
        assert_err!(
            run(&mut a, img, &geom, &mut buf),
            Error::InvalidGeometry { .. }
        );
    }
    // A of the wrong size (no room for the bias).
    let mut a_small = output::<T>(k - 1, k - 1, 10);
    let small_before = a_small.bits();
    assert_err!(
        run(&mut a_small, img, &good, &mut buf),
        Error::DimensionMismatch { .. }
    );
    assert_eq!(a_small.bits(), small_before);
    // Non-finite alpha / beta.
    assert_err!(
        conv2d_a_update(
            a.view_mut(),
            T::from_f64(f64::NAN),
            T::ONE,
            img,
            &good,
            true,
            ConvNormalization::Kfc,
            SEQ,
            MemStack::new(&mut buf),
        ),
        Error::InvalidParameter { .. }
    );
    assert_err!(
        conv2d_a_update(
            a.view_mut(),
            T::ONE,
            T::from_f64(f64::INFINITY),
            img,
            &good,
            true,
            ConvNormalization::KfacPytorch,
            SEQ,
            MemStack::new(&mut buf),
        ),
        Error::InvalidParameter { .. }
    );
    // Empty batch.
    let empty: Vec<T> = vec![];
    let geom0 = Conv2dGeometry::new(0, c, h, w, 3, 2);
    let img0 = ImageRef::nchw(&empty, 0, c, h, w).unwrap();
    let mut buf0 = buffer(conv2d_a_update_scratch::<T>(&geom0, true).unwrap());
    assert_err!(
        run(&mut a, img0, &geom0, &mut buf0),
        Error::InvalidParameter { .. }
    );
    // Scratch too small.
    let mut small = small_buffer(conv2d_a_update_scratch::<T>(&good, true).unwrap());
    assert_err!(
        run(&mut a, img, &good, &mut small),
        Error::ScratchTooSmall { .. }
    );
    assert_eq!(a.bits(), before);

    // G: wrong size, non-finite alpha, empty batch.
    let (co, oh, ow) = (3, 3, 3);
    let gdata: Vec<T> = (0..n * co * oh * ow)
        .map(|v| T::from_f64((v % 5) as f64 - 2.0))
        .collect();
    let gimg = ImageRef::nhwc(&gdata, n, co, oh, ow).unwrap();
    let mut g = output::<T>(co + 1, co + 1, 11);
    let gbefore = g.bits();
    assert_err!(
        conv2d_g_update(
            g.view_mut(),
            T::ONE,
            T::ONE,
            gimg,
            ConvNormalization::Kfc,
            SEQ
        ),
        Error::DimensionMismatch { .. }
    );
    assert_eq!(g.bits(), gbefore);
    let mut g = output::<T>(co, co, 12);
    let gbefore = g.bits();
    assert_err!(
        conv2d_g_update(
            g.view_mut(),
            T::from_f64(f64::INFINITY),
            T::ONE,
            gimg,
            ConvNormalization::Kfc,
            SEQ
        ),
        Error::InvalidParameter { .. }
    );
    let gimg0 = ImageRef::nchw(&empty, 0, co, oh, ow).unwrap();
    assert_err!(
        conv2d_g_update(
            g.view_mut(),
            T::ONE,
            T::ONE,
            gimg0,
            ConvNormalization::Kfc,
            SEQ
        ),
        Error::InvalidParameter { .. }
    );
    assert_eq!(g.bits(), gbefore);

    // Tensor views: wrong length, strides reaching past the end.
    assert_err!(
        ImageRef::nchw(&data[1..], n, c, h, w),
        Error::LengthMismatch { .. }
    );
    assert_err!(
        ImageRef::nhwc(&data, n, c, h + 1, w),
        Error::LengthMismatch { .. }
    );
    assert_err!(
        ImageRef::with_strides(&data, [n, c, h, w], [c * h * w, h * w, w, 2]),
        Error::InvalidGeometry { .. }
    );
}

#[test]
fn conv_updates_reject_bad_geometry_and_arguments_and_leave_factors_untouched() {
    conv_errors::<f32>();
    conv_errors::<f64>();
}

#[derive(Clone, Debug)]
struct ImageNanCase {
    dims: [usize; 4],
    at: [usize; 4],
    nhwc: bool,
    which: u8,
    for_g: bool,
}

fn image_nan_case() -> impl Strategy<Value = ImageNanCase> {
    (
        [1usize..=3, 1usize..=3, 2usize..=5, 2usize..=5],
        any::<bool>(),
        any::<u8>(),
        any::<bool>(),
    )
        .prop_flat_map(|(dims, nhwc, which, for_g)| {
            [0..dims[0], 0..dims[1], 0..dims[2], 0..dims[3]].prop_map(move |at| ImageNanCase {
                dims,
                at,
                nhwc,
                which,
                for_g,
            })
        })
}

/// A NaN/Inf anywhere in the input (A) or output-gradient (G) tensor is
/// rejected with `NonFinite` and the factor is untouched.
fn check_image_non_finite<T: Flt>(case: &ImageNanCase) -> Result<(), TestCaseError> {
    let [n, c, h, w] = case.dims;
    let [i, ch, y, x] = case.at;
    let mut data: Vec<T> = (0..n * c * h * w)
        .map(|v| T::from_f64((v % 7) as f64 / 7.0))
        .collect();
    let off = if case.nhwc {
        ((i * h + y) * w + x) * c + ch
    } else {
        ((i * c + ch) * h + y) * w + x
    };
    data[off] = non_finite::<T>(case.which);
    let img = if case.nhwc {
        ImageRef::nhwc(&data, n, c, h, w)
    } else {
        ImageRef::nchw(&data, n, c, h, w)
    }
    .unwrap();
    let r = if case.for_g {
        let mut g = output::<T>(c, c, 13);
        let before = g.bits();
        let r = conv2d_g_update(
            g.view_mut(),
            T::ONE,
            T::ONE,
            img,
            ConvNormalization::Kfc,
            SEQ,
        );
        prop_assert_eq!(g.bits(), before);
        r
    } else {
        let geom = Conv2dGeometry::new(n, c, h, w, 2, 2);
        let k = c * 4;
        let mut a = output::<T>(k, k, 14);
        let before = a.bits();
        let mut buf = buffer(conv2d_a_update_scratch::<T>(&geom, false).unwrap());
        let r = conv2d_a_update(
            a.view_mut(),
            T::ONE,
            T::ONE,
            img,
            &geom,
            false,
            ConvNormalization::Kfc,
            SEQ,
            MemStack::new(&mut buf),
        );
        prop_assert_eq!(a.bits(), before);
        r
    };
    prop_assert!(
        matches!(r, Err(Error::NonFinite { .. })),
        "expected NonFinite, got {:?}",
        r
    );
    Ok(())
}

both_types!(
    conv_updates_reject_non_finite_tensors,
    image_nan_case(),
    check_image_non_finite
);

// ---------------------------------------------------------------------------
// eigen
// ---------------------------------------------------------------------------

fn eigen_errors<T: Flt>() {
    let d = 4;
    let a = Stored::<T>::from_m(
        &psd_factor::<T>(&mut Gen::new(15), 6, d, Kind::Uniform),
        Layout::ColMajor,
        T::ZERO,
    );
    let mut buf = buffer(sym_eigen_scratch::<T>(d, SEQ));
    let mut l = vec![T::from_f64(-5.0); d];
    let mut q = output::<T>(d, d, 16);
    let (lb, qb) = (slice_bits(&l), q.bits());

    // Non-square factor, wrong eigenvalue count, wrong eigenvector shape.
    let rect = input::<T>(d, d + 1, 17);
    assert_err!(
        sym_eigen(
            rect.view(),
            &mut l,
            q.view_mut(),
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::DimensionMismatch { .. }
    );
    let mut l_short = vec![T::from_f64(-5.0); d - 1];
    assert_err!(
        sym_eigen(
            a.view(),
            &mut l_short,
            q.view_mut(),
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::LengthMismatch { .. }
    );
    assert!(l_short.iter().all(|&v| v == T::from_f64(-5.0)));
    let mut q_bad = output::<T>(d, d - 1, 18);
    let q_bad_before = q_bad.bits();
    assert_err!(
        sym_eigen(
            a.view(),
            &mut l,
            q_bad.view_mut(),
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::DimensionMismatch { .. }
    );
    assert_eq!(q_bad.bits(), q_bad_before);
    let mut small = small_buffer(sym_eigen_scratch::<T>(d, SEQ));
    assert_err!(
        sym_eigen(
            a.view(),
            &mut l,
            q.view_mut(),
            SEQ,
            MemStack::new(&mut small)
        ),
        Error::ScratchTooSmall { .. }
    );
    assert_eq!((slice_bits(&l), q.bits()), (lb.clone(), qb.clone()));

    // Preconditioning: a valid decomposition to start from.
    let (d_out, d_in) = (3, d);
    let g = Stored::<T>::from_m(
        &psd_factor::<T>(&mut Gen::new(19), 5, d_out, Kind::Uniform),
        Layout::ColMajor,
        T::ZERO,
    );
    let mut la = vec![T::ZERO; d_in];
    let mut qa = Stored::<T>::filled(d_in, d_in, Layout::ColMajor, T::ZERO);
    sym_eigen(
        a.view(),
        &mut la,
        qa.view_mut(),
        SEQ,
        MemStack::new(&mut buf),
    )
    .unwrap();
    let mut lg = vec![T::ZERO; d_out];
    let mut qg = Stored::<T>::filled(d_out, d_out, Layout::ColMajor, T::ZERO);
    sym_eigen(
        g.view(),
        &mut lg,
        qg.view_mut(),
        SEQ,
        MemStack::new(&mut buf),
    )
    .unwrap();
    let mut pbuf = buffer(precondition_eigen_scratch::<T>(d_out, d_in, SEQ));
    let mut grad = output::<T>(d_out, d_in, 20);
    let gb = grad.bits();
    let mut run = |grad: &mut Stored<T>,
                   qg: MatRef<'_, T>,
                   lg: &[T],
                   qa: MatRef<'_, T>,
                   la: &[T],
                   damping: f64| {
        precondition_eigen(
            grad.view_mut(),
            qg,
            lg,
            qa,
            la,
            T::from_f64(damping),
            SEQ,
            MemStack::new(&mut pbuf),
        )
    };
    // Damping must be finite and > 0.
    for damping in [0.0, -1e-3, f64::NAN, f64::INFINITY] {
        assert_err!(
            run(&mut grad, qg.view(), &lg, qa.view(), &la, damping),
            Error::InvalidParameter { .. }
        );
    }
    // Negative / non-finite eigenvalues.
    let mut la_neg = la.clone();
    la_neg[1] = T::from_f64(-1e-3);
    assert_err!(
        run(&mut grad, qg.view(), &lg, qa.view(), &la_neg, 0.1),
        Error::InvalidParameter { .. }
    );
    let mut lg_nan = lg.clone();
    lg_nan[0] = T::from_f64(f64::NAN);
    assert_err!(
        run(&mut grad, qg.view(), &lg_nan, qa.view(), &la, 0.1),
        Error::NonFinite { .. }
    );
    // Shape and length mismatches (Q_A and Q_G swapped; a short l_A).
    assert_err!(
        run(&mut grad, qa.view(), &lg, qg.view(), &la, 0.1),
        Error::DimensionMismatch { .. }
    );
    assert_err!(
        run(&mut grad, qg.view(), &lg, qa.view(), &la[1..], 0.1),
        Error::LengthMismatch { .. }
    );
    // NaN in Q_A.
    let mut qa_nan = qa.clone();
    qa_nan.set(2, 1, T::from_f64(f64::NAN));
    assert_err!(
        run(&mut grad, qg.view(), &lg, qa_nan.view(), &la, 0.1),
        Error::NonFinite { .. }
    );
    assert_eq!(grad.bits(), gb);
    // NaN in the gradient: rejected, gradient (NaN included) untouched.
    let mut grad_nan = grad.clone();
    grad_nan.set(1, 2, T::from_f64(f64::INFINITY));
    let gnb = grad_nan.bits();
    assert_err!(
        run(&mut grad_nan, qg.view(), &lg, qa.view(), &la, 0.1),
        Error::NonFinite { row: 1, col: 2, .. }
    );
    assert_eq!(grad_nan.bits(), gnb);
    // Scratch too small.
    let mut small = small_buffer(precondition_eigen_scratch::<T>(d_out, d_in, SEQ));
    assert_err!(
        precondition_eigen(
            grad.view_mut(),
            qg.view(),
            &lg,
            qa.view(),
            &la,
            T::from_f64(0.1),
            SEQ,
            MemStack::new(&mut small)
        ),
        Error::ScratchTooSmall { .. }
    );
    assert_eq!(grad.bits(), gb);

    // Denominators: damping, negative eigenvalue, shape.
    let mut den = output::<T>(d_out, d_in, 21);
    let db = den.bits();
    for damping in [0.0, -1.0, f64::NAN] {
        assert_err!(
            eigen_inverse_denominators(den.view_mut(), &lg, &la, T::from_f64(damping)),
            Error::InvalidParameter { .. }
        );
    }
    assert_err!(
        eigen_inverse_denominators(den.view_mut(), &lg, &la_neg, T::from_f64(0.1)),
        Error::InvalidParameter { .. }
    );
    assert_err!(
        eigen_inverse_denominators(den.view_mut(), &la, &lg, T::from_f64(0.1)),
        Error::DimensionMismatch { .. }
    );
    assert_eq!(den.bits(), db);
    // Precomputed: denominators of the wrong shape or non-finite.
    let mut den_ok = Stored::<T>::filled(d_out, d_in, Layout::ColMajor, T::ZERO);
    eigen_inverse_denominators(den_ok.view_mut(), &lg, &la, T::from_f64(0.1)).unwrap();
    let den_t = Stored::<T>::filled(d_in, d_out, Layout::ColMajor, T::ONE);
    let mut pbuf = buffer(precondition_eigen_scratch::<T>(d_out, d_in, SEQ));
    assert_err!(
        precondition_eigen_precomputed(
            grad.view_mut(),
            qg.view(),
            qa.view(),
            den_t.view(),
            SEQ,
            MemStack::new(&mut pbuf)
        ),
        Error::DimensionMismatch { .. }
    );
    let mut den_nan = den_ok.clone();
    den_nan.set(2, 3, T::from_f64(f64::NAN));
    assert_err!(
        precondition_eigen_precomputed(
            grad.view_mut(),
            qg.view(),
            qa.view(),
            den_nan.view(),
            SEQ,
            MemStack::new(&mut pbuf)
        ),
        Error::NonFinite { .. }
    );
    assert_err!(
        precondition_eigen_precomputed(
            grad.view_mut(),
            qg.view(),
            qa.view(),
            den_ok.view(),
            SEQ,
            MemStack::new(&mut small)
        ),
        Error::ScratchTooSmall { .. }
    );
    assert_eq!(grad.bits(), gb);
}

#[test]
fn eigen_kernels_reject_bad_arguments_and_leave_outputs_untouched() {
    eigen_errors::<f32>();
    eigen_errors::<f64>();
}

#[derive(Clone, Debug)]
struct LowerNanCase {
    d: usize,
    i: usize,
    j: usize,
    which: u8,
    layout: Layout,
}

fn lower_nan_case() -> impl Strategy<Value = LowerNanCase> {
    (1usize..=10, any::<u8>(), layout()).prop_flat_map(|(d, which, layout)| {
        (0..d, 0..d).prop_map(move |(a, b)| LowerNanCase {
            d,
            i: a.max(b),
            j: a.min(b),
            which,
            layout,
        })
    })
}

/// A NaN/Inf in the lower triangle of a factor is rejected by `sym_eigen`,
/// `damped_inverse` and `kron_damped_solve` with `NonFinite`, outputs
/// untouched.
fn check_lower_non_finite<T: Flt>(case: &LowerNanCase) -> Result<(), TestCaseError> {
    let d = case.d;
    let f = psd_factor::<T>(&mut Gen::new(22), d + 2, d, Kind::Uniform);
    let mut a = Stored::<T>::from_m(&f, case.layout, T::ZERO);
    a.set(case.i, case.j, non_finite::<T>(case.which));

    let mut l = vec![T::from_f64(3.0); d];
    let mut q = output::<T>(d, d, 23);
    let (lb, qb) = (slice_bits(&l), q.bits());
    let mut buf = buffer(sym_eigen_scratch::<T>(d, SEQ));
    let r = sym_eigen(a.view(), &mut l, q.view_mut(), SEQ, MemStack::new(&mut buf));
    prop_assert!(
        matches!(r, Err(Error::NonFinite { .. })),
        "sym_eigen: {:?}",
        r
    );
    prop_assert_eq!((slice_bits(&l), q.bits()), (lb, qb));

    let mut out = output::<T>(d, d, 24);
    let ob = out.bits();
    let mut buf = buffer(damped_inverse_scratch::<T>(d, SEQ));
    let r = damped_inverse(
        out.view_mut(),
        a.view(),
        T::from_f64(0.1),
        SEQ,
        MemStack::new(&mut buf),
    );
    prop_assert!(
        matches!(r, Err(Error::NonFinite { .. })),
        "damped_inverse: {:?}",
        r
    );
    prop_assert_eq!(out.bits(), ob);

    let g = Stored::<T>::from_m(&M::identity(2), Layout::ColMajor, T::ZERO);
    let mut x = output::<T>(2, d, 25);
    let xb = x.bits();
    let mut buf = buffer(kron_damped_solve_scratch::<T>(2, d, SEQ));
    let r = kron_damped_solve(
        x.view_mut(),
        a.view(),
        g.view(),
        T::from_f64(0.1),
        SEQ,
        MemStack::new(&mut buf),
    );
    prop_assert!(
        matches!(r, Err(Error::NonFinite { .. })),
        "kron_damped_solve: {:?}",
        r
    );
    prop_assert_eq!(x.bits(), xb);
    Ok(())
}

both_types!(
    factor_solvers_reject_non_finite_lower_triangle,
    lower_nan_case(),
    check_lower_non_finite
);

// ---------------------------------------------------------------------------
// inverse
// ---------------------------------------------------------------------------

fn inverse_errors<T: Flt>() {
    let d = 4;
    let mut buf = buffer(damped_inverse_scratch::<T>(d, SEQ));
    let mut out = output::<T>(d, d, 26);
    let ob = out.bits();
    // Negative definite with zero shift: Cholesky meets a negative pivot.
    let neg = Stored::<T>::from_m(
        &spread_spectrum::<T>(&mut Gen::new(27), d, 2.0).scale(-1.0),
        Layout::RowMajor,
        T::ZERO,
    );
    assert_err!(
        damped_inverse(
            out.view_mut(),
            neg.view(),
            T::ZERO,
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::NotPositiveDefinite { dim: 4, .. }
    );
    // An indefinite matrix whose shift is not enough: diag(1, -1) + 0.5 I.
    let indef = Stored::<T>::from_m(
        &M::from_fn(2, 2, |i, j| match (i, j) {
            (0, 0) => 1.0,
            (1, 1) => -1.0,
            _ => 0.0,
        }),
        Layout::ColMajor,
        T::ZERO,
    );
    let mut out2 = output::<T>(2, 2, 28);
    let o2b = out2.bits();
    assert_err!(
        damped_inverse(
            out2.view_mut(),
            indef.view(),
            T::from_f64(0.5),
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::NotPositiveDefinite {
            pivot: 1,
            dim: 2,
            ..
        }
    );
    assert_eq!(out2.bits(), o2b);
    // Shift must be finite and >= 0.
    let a = Stored::<T>::from_m(
        &psd_factor::<T>(&mut Gen::new(29), 6, d, Kind::Uniform),
        Layout::ColMajor,
        T::ZERO,
    );
    for shift in [-1e-3, f64::NAN, f64::INFINITY] {
        assert_err!(
            damped_inverse(
                out.view_mut(),
                a.view(),
                T::from_f64(shift),
                SEQ,
                MemStack::new(&mut buf)
            ),
            Error::InvalidParameter { .. }
        );
    }
    // Shapes.
    let rect = input::<T>(d, d - 1, 30);
    assert_err!(
        damped_inverse(
            out.view_mut(),
            rect.view(),
            T::ONE,
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::DimensionMismatch { .. }
    );
    let mut out_small = output::<T>(d - 1, d - 1, 31);
    let osb = out_small.bits();
    assert_err!(
        damped_inverse(
            out_small.view_mut(),
            a.view(),
            T::ONE,
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::DimensionMismatch { .. }
    );
    assert_eq!(out_small.bits(), osb);
    // Scratch.
    let mut small = small_buffer(damped_inverse_scratch::<T>(d, SEQ));
    assert_err!(
        damped_inverse(
            out.view_mut(),
            a.view(),
            T::ONE,
            SEQ,
            MemStack::new(&mut small)
        ),
        Error::ScratchTooSmall { .. }
    );
    assert_eq!(out.bits(), ob);

    // factored_damping / tikhonov_pi.
    let g = Stored::<T>::from_m(&M::identity(3), Layout::ColMajor, T::ZERO);
    for damping in [0.0, -0.1, f64::NAN, f64::INFINITY] {
        assert_err!(
            factored_damping(a.view(), g.view(), T::from_f64(damping)),
            Error::InvalidParameter { .. }
        );
    }
    assert_err!(
        factored_damping(rect.view(), g.view(), T::ONE),
        Error::DimensionMismatch { .. }
    );
    assert_err!(
        tikhonov_pi(a.view(), rect.view()),
        Error::DimensionMismatch { .. }
    );
    let mut a_inf = a.clone();
    a_inf.set(2, 2, T::from_f64(f64::INFINITY));
    assert_err!(tikhonov_pi(a_inf.view(), g.view()), Error::NonFinite { .. });
    assert_err!(
        factored_damping(g.view(), a_inf.view(), T::ONE),
        Error::NonFinite { .. }
    );

    // precondition_inverse: shapes, non-finite inputs, scratch.
    let (d_out, d_in) = (3, d);
    let mut grad = output::<T>(d_out, d_in, 32);
    let gb = grad.bits();
    let a_inv = input::<T>(d_in, d_in, 33);
    let g_inv = input::<T>(d_out, d_out, 34);
    let mut pbuf = buffer(precondition_inverse_scratch::<T>(d_out, d_in, SEQ));
    assert_err!(
        precondition_inverse(
            grad.view_mut(),
            a_inv.view(),
            g_inv.view(),
            SEQ,
            MemStack::new(&mut pbuf)
        ),
        Error::DimensionMismatch { .. }
    );
    let mut a_inv_nan = a_inv.clone();
    a_inv_nan.set(3, 0, T::from_f64(f64::NAN));
    assert_err!(
        precondition_inverse(
            grad.view_mut(),
            g_inv.view(),
            a_inv_nan.view(),
            SEQ,
            MemStack::new(&mut pbuf)
        ),
        Error::NonFinite { .. }
    );
    let mut small = small_buffer(precondition_inverse_scratch::<T>(d_out, d_in, SEQ));
    assert_err!(
        precondition_inverse(
            grad.view_mut(),
            g_inv.view(),
            a_inv.view(),
            SEQ,
            MemStack::new(&mut small)
        ),
        Error::ScratchTooSmall { .. }
    );
    assert_eq!(grad.bits(), gb);
    let mut grad_nan = grad.clone();
    grad_nan.set(0, 3, T::from_f64(f64::NEG_INFINITY));
    let gnb = grad_nan.bits();
    assert_err!(
        precondition_inverse(
            grad_nan.view_mut(),
            g_inv.view(),
            a_inv.view(),
            SEQ,
            MemStack::new(&mut pbuf)
        ),
        Error::NonFinite { row: 0, col: 3, .. }
    );
    assert_eq!(grad_nan.bits(), gnb);
}

#[test]
fn inverse_kernels_reject_bad_arguments_and_leave_outputs_untouched() {
    inverse_errors::<f32>();
    inverse_errors::<f64>();
}

/// An inverse that overflows (a subnormal pivot) is reported as
/// `NonFinite`, not returned as infinities.
#[test]
fn damped_inverse_reports_overflowing_inverse() {
    let a = Mat::<f64>::from_fn(2, 2, |i, j| if i == j { 1e-310 } else { 0.0 });
    let mut out = output::<f64>(2, 2, 35);
    let ob = out.bits();
    let mut buf = buffer(damped_inverse_scratch::<f64>(2, SEQ));
    assert_err!(
        damped_inverse(
            out.view_mut(),
            a.as_ref(),
            0.0,
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::NonFinite { .. }
    );
    assert_eq!(out.bits(), ob);
}

// ---------------------------------------------------------------------------
// kron
// ---------------------------------------------------------------------------

fn kron_errors<T: Flt>() {
    let a = input::<T>(2, 3, 36);
    let b = input::<T>(4, 2, 37);
    let mut out = output::<T>(8, 5, 38);
    let ob = out.bits();
    assert_err!(
        kron(out.view_mut(), a.view(), b.view()),
        Error::DimensionMismatch {
            expected: (8, 6),
            found: (8, 5),
            ..
        }
    );
    assert_eq!(out.bits(), ob);

    // kron_apply: X must be q x n = 2 x 3, out p x m = 4 x 2.
    let x_bad = input::<T>(3, 2, 39);
    let x = input::<T>(2, 3, 40);
    let mut y = output::<T>(4, 2, 41);
    let yb = y.bits();
    let mut buf = buffer(kron_apply_scratch::<T>(4, 3, SEQ));
    assert_err!(
        kron_apply(
            y.view_mut(),
            a.view(),
            b.view(),
            x_bad.view(),
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::DimensionMismatch { .. }
    );
    let mut y_bad = output::<T>(2, 4, 42);
    let ybb = y_bad.bits();
    assert_err!(
        kron_apply(
            y_bad.view_mut(),
            a.view(),
            b.view(),
            x.view(),
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::DimensionMismatch { .. }
    );
    assert_eq!(y_bad.bits(), ybb);
    let mut small = small_buffer(kron_apply_scratch::<T>(4, 3, SEQ));
    assert_err!(
        kron_apply(
            y.view_mut(),
            a.view(),
            b.view(),
            x.view(),
            SEQ,
            MemStack::new(&mut small)
        ),
        Error::ScratchTooSmall { .. }
    );
    assert_eq!(y.bits(), yb);

    // kron_damped_solve: damping, shapes, non-finite rhs, scratch.
    let (d_out, d_in) = (2, 3);
    let fa = Stored::<T>::from_m(&M::identity(d_in), Layout::ColMajor, T::ZERO);
    let fg = Stored::<T>::from_m(&M::identity(d_out), Layout::ColMajor, T::ZERO);
    let mut rhs = output::<T>(d_out, d_in, 43);
    let rb = rhs.bits();
    let mut buf = buffer(kron_damped_solve_scratch::<T>(d_out, d_in, SEQ));
    for damping in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_err!(
            kron_damped_solve(
                rhs.view_mut(),
                fa.view(),
                fg.view(),
                T::from_f64(damping),
                SEQ,
                MemStack::new(&mut buf)
            ),
            Error::InvalidParameter { .. }
        );
    }
    assert_err!(
        kron_damped_solve(
            rhs.view_mut(),
            fg.view(),
            fa.view(),
            T::ONE,
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::DimensionMismatch { .. }
    );
    let mut small = small_buffer(kron_damped_solve_scratch::<T>(d_out, d_in, SEQ));
    assert_err!(
        kron_damped_solve(
            rhs.view_mut(),
            fa.view(),
            fg.view(),
            T::ONE,
            SEQ,
            MemStack::new(&mut small)
        ),
        Error::ScratchTooSmall { .. }
    );
    assert_eq!(rhs.bits(), rb);
    let mut rhs_nan = rhs.clone();
    rhs_nan.set(1, 1, T::from_f64(f64::NAN));
    let rnb = rhs_nan.bits();
    assert_err!(
        kron_damped_solve(
            rhs_nan.view_mut(),
            fa.view(),
            fg.view(),
            T::ONE,
            SEQ,
            MemStack::new(&mut buf)
        ),
        Error::NonFinite { .. }
    );
    assert_eq!(rhs_nan.bits(), rnb);
}

#[test]
fn kron_kernels_reject_bad_arguments_and_leave_outputs_untouched() {
    kron_errors::<f32>();
    kron_errors::<f64>();
}

// ---------------------------------------------------------------------------
// packed
// ---------------------------------------------------------------------------

fn packed_errors<T: Flt>() {
    let n = 4;
    let m = input::<T>(n, n, 44);
    // pack_lower: wrong length, non-square source.
    for len in [9, 11, 0, 16] {
        let mut p = vec![T::from_f64(-1.0); len];
        assert_err!(
            pack_lower(m.view(), &mut p),
            Error::LengthMismatch { expected: 10, .. }
        );
        assert!(p.iter().all(|&v| v == T::from_f64(-1.0)));
    }
    let rect = input::<T>(n, n + 1, 45);
    let mut p = vec![T::from_f64(-1.0); 10];
    assert_err!(
        pack_lower(rect.view(), &mut p),
        Error::DimensionMismatch { .. }
    );
    assert!(p.iter().all(|&v| v == T::from_f64(-1.0)));

    // unpack_lower / add_packed_to_lower: wrong length, non-square, bad scale.
    let src = vec![T::ONE; 10];
    let mut dst = output::<T>(n, n, 46);
    let db = dst.bits();
    for mirror in [false, true] {
        assert_err!(
            unpack_lower(&src[..9], dst.view_mut(), mirror),
            Error::LengthMismatch { .. }
        );
    }
    assert_err!(
        add_packed_to_lower(&src[..9], dst.view_mut(), T::ONE),
        Error::LengthMismatch { .. }
    );
    for scale in [f64::NAN, f64::INFINITY] {
        assert_err!(
            add_packed_to_lower(&src, dst.view_mut(), T::from_f64(scale)),
            Error::InvalidParameter { .. }
        );
    }
    assert_eq!(dst.bits(), db);
    let mut dst_rect = output::<T>(n, n + 1, 47);
    let drb = dst_rect.bits();
    assert_err!(
        unpack_lower(&src, dst_rect.view_mut(), true),
        Error::DimensionMismatch { .. }
    );
    assert_err!(
        add_packed_to_lower(&src, dst_rect.view_mut(), T::ONE),
        Error::DimensionMismatch { .. }
    );
    assert_eq!(dst_rect.bits(), drb);

    // accumulate_packed: lengths, scale.
    let mut acc = vec![T::from_f64(2.0); 10];
    assert_err!(
        accumulate_packed(&mut acc, &src[..9], T::ONE),
        Error::LengthMismatch { .. }
    );
    assert_err!(
        accumulate_packed(&mut acc, &src, T::from_f64(f64::NAN)),
        Error::InvalidParameter { .. }
    );
    assert!(acc.iter().all(|&v| v == T::from_f64(2.0)));
}

#[test]
fn packed_kernels_reject_wrong_lengths_and_leave_outputs_untouched() {
    packed_errors::<f32>();
    packed_errors::<f64>();
}

#[test]
fn conversions_reject_mismatched_lengths_and_leave_outputs_untouched() {
    let src = [1.0f32, 2.0, 3.0];
    let mut b = [bf16::from_bits(0x1234); 2];
    assert_err!(f32_to_bf16(&src, &mut b), Error::LengthMismatch { .. });
    assert_eq!(b, [bf16::from_bits(0x1234); 2]);
    let mut h = [f16::from_bits(0x1234); 4];
    assert_err!(f32_to_f16(&src, &mut h), Error::LengthMismatch { .. });
    assert_eq!(h, [f16::from_bits(0x1234); 4]);
    let mut w = [7.0f32; 2];
    assert_err!(
        bf16_to_f32(&[bf16::ONE; 3], &mut w),
        Error::LengthMismatch { .. }
    );
    assert_err!(
        f16_to_f32(&[f16::ONE; 1], &mut w),
        Error::LengthMismatch { .. }
    );
    assert_eq!(w, [7.0f32; 2]);
}

// ---------------------------------------------------------------------------
// kl
// ---------------------------------------------------------------------------

fn kl_errors<T: Flt>() {
    let a = input::<T>(3, 4, 48);
    let b = input::<T>(4, 3, 49);
    assert_err!(
        frobenius_dot(a.view(), b.view()),
        Error::DimensionMismatch { .. }
    );
    for kl in [0.0, -1e-3, f64::NAN, f64::INFINITY] {
        assert_err!(
            kl_clip_scale(T::ONE, T::from_f64(0.1), T::from_f64(kl)),
            Error::InvalidParameter { .. }
        );
    }
    for lr in [f64::NAN, f64::INFINITY] {
        assert_err!(
            kl_clip_scale(T::ONE, T::from_f64(lr), T::from_f64(1e-3)),
            Error::InvalidParameter { .. }
        );
    }
    for sum in [f64::NAN, f64::NEG_INFINITY] {
        assert_err!(
            kl_clip_scale(T::from_f64(sum), T::from_f64(0.1), T::from_f64(1e-3)),
            Error::InvalidParameter { .. }
        );
    }
}

#[test]
fn kl_kernels_reject_bad_arguments() {
    kl_errors::<f32>();
    kl_errors::<f64>();
}

/// #11 item 10: a strided view whose logical element count overflows usize
/// (huge dims, zero strides) is refused with `SizeOverflow`, not an
/// arithmetic-overflow panic, by the finiteness check and the G kernel.
#[test]
fn huge_strided_views_are_refused_not_overflowed() {
    let data = [1.0f32; 4];
    let big = 1usize << 20;
    let img = ImageRef::with_strides(&data, [big, big, big, big], [0, 0, 0, 0]).unwrap();
    assert!(matches!(
        kfac_kernels::check::finite_image(img),
        Err(Error::SizeOverflow { .. })
    ));
    let img = ImageRef::with_strides(&data, [big, 1, big, big * big], [0, 0, 0, 0]).unwrap();
    let mut g = Mat::<f32>::zeros(1, 1);
    let r = conv2d_g_update(g.as_mut(), 0.0, 1.0, img, ConvNormalization::Kfc, Par::Seq);
    assert!(matches!(r, Err(Error::SizeOverflow { .. })), "{r:?}");
    assert_eq!(g[(0, 0)], 0.0);
}

/// The sums of squares the finiteness proofs carry equal a naive f64 sum,
/// for every layout and for values whose f32 squares overflow.
#[test]
fn finiteness_proofs_carry_the_sum_of_squares() {
    let vals: Vec<f32> = (0..7 * 5).map(|k| (k as f32 - 17.0) * 1.5e18).collect();
    let naive: f64 = vals.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let close = |s: f64| ((s - naive) / naive).abs() < 1e-12;
    let rm = MatRef::from_row_major_slice(&vals, 7, 5);
    let cm = MatRef::from_column_major_slice(&vals, 7, 5);
    for m in [rm, cm, rm.reverse_rows(), cm.transpose()] {
        let s = kfac_kernels::check::finite_matrix("x", m)
            .unwrap()
            .sum_of_squares();
        assert!(close(s), "{s} vs {naive}");
    }
    // A matrix view with neither stride 1 (every other row and column).
    let wide: Vec<f32> = (0..14 * 10).map(|k| (k % 10) as f32).collect();
    let sub = MatRef::from_row_major_slice(&wide, 14, 10);
    let sub = unsafe_free_every_other(sub);
    assert!(sub.row_stride() != 1 && sub.col_stride() != 1);
    let want: f64 = (0..7)
        .flat_map(|i| (0..5).map(move |j| (i, j)))
        .map(|(i, j)| sub[(i, j)] as f64 * sub[(i, j)] as f64)
        .sum();
    let got = kfac_kernels::check::finite_matrix("x", sub)
        .unwrap()
        .sum_of_squares();
    assert_eq!(got, want);
    let nchw = ImageRef::nchw(&vals, 1, 5, 7, 1).unwrap();
    let s = kfac_kernels::check::finite_image(nchw)
        .unwrap()
        .sum_of_squares();
    assert!(close(s));
    let strided = ImageRef::with_strides(&vals, [5, 1, 7, 1], [1, 0, 5, 0]).unwrap();
    let s = kfac_kernels::check::finite_image(strided)
        .unwrap()
        .sum_of_squares();
    assert!(close(s));
}

/// Every other row and column of a 14 x 10 row-major matrix: a view with no
/// unit stride.
fn unsafe_free_every_other(m: MatRef<'_, f32>) -> MatRef<'_, f32> {
    assert_eq!(
        (m.nrows(), m.ncols(), m.row_stride(), m.col_stride()),
        (14, 10, 10, 1)
    );
    // SAFETY: the 7 x 5 view with strides (20, 2) addresses offsets up to
    // 6 * 20 + 4 * 2 = 128 < 140, all inside `m`'s data, and borrows it
    // for `m`'s lifetime (read-only).
    unsafe { MatRef::from_raw_parts(m.as_ptr(), 7, 5, 20, 2) }
}
