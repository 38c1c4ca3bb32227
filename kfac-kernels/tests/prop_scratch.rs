//! The scratch contract: every kernel that takes a `MemStack` succeeds with
//! *any* stack that can hold its published `*_scratch` requirement (at any
//! address alignment, with no spare byte), and gives bitwise the same result
//! as with a generous stack.

#[macro_use]
mod common;

use common::*;
use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::Par;
use kfac_kernels::conv::{
    conv2d_a_update, conv2d_a_update_scratch, Conv2dGeometry, ConvNormalization, ImageRef,
};
use kfac_kernels::eigen::{
    eigen_inverse_denominators, precondition_eigen, precondition_eigen_precomputed,
    precondition_eigen_scratch, sym_eigen, sym_eigen_scratch,
};
use kfac_kernels::factor::{syrk_update, syrk_update_scratch};
use kfac_kernels::inverse::{
    damped_inverse, damped_inverse_scratch, precondition_inverse, precondition_inverse_scratch,
};
use kfac_kernels::kron::{
    kron_apply, kron_apply_scratch, kron_damped_solve, kron_damped_solve_scratch,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Runs `f` on a stack of exactly `align_offset + size` bytes starting
/// `offset` bytes past a 256-byte boundary, so that it can hold `req` and
/// not one byte more.
fn with_tight_stack<R>(req: StackReq, offset: usize, f: impl FnOnce(&mut MemStack) -> R) -> R {
    let size = req.size_bytes();
    let mut raw = MemBuffer::new(StackReq::new_aligned::<u8>(size + 512, 256));
    let base = &mut raw[offset..];
    let pad = base.as_ptr().align_offset(req.align_bytes());
    let slice = &mut base[..pad + size];
    let stack = MemStack::new(slice);
    assert!(
        stack.can_hold(req),
        "test setup: the tight stack must hold req"
    );
    f(stack)
}

#[derive(Clone, Debug)]
struct ScratchCase {
    d1: usize,
    d2: usize,
    n: usize,
    offset: usize,
    rayon: bool,
    seed: u64,
}

fn scratch_case() -> impl Strategy<Value = ScratchCase> {
    (
        1usize..=12,
        1usize..=12,
        1usize..=20,
        0usize..256,
        par(),
        any::<u64>(),
    )
        .prop_map(|(d1, d2, n, offset, rayon, seed)| ScratchCase {
            d1,
            d2,
            n,
            offset,
            rayon,
            seed,
        })
}

type Run<'a, T> = dyn Fn(&mut Stored<T>, &mut MemStack) -> kfac_kernels::Result<()> + 'a;

/// Runs `kernel` on a copy of `out` with a tight stack at `offset` and with
/// a generous one; both must succeed with bitwise equal outputs.
fn same_with_tight_stack<T: Flt>(
    what: &str,
    req: StackReq,
    offset: usize,
    out: &Stored<T>,
    kernel: &Run<'_, T>,
) -> Result<(), TestCaseError> {
    let mut tight = out.clone();
    let r = with_tight_stack(req, offset, |stack| kernel(&mut tight, stack));
    prop_assert!(r.is_ok(), "{}: tight stack: {:?}", what, r);
    let mut roomy = out.clone();
    let mut buf = MemBuffer::new(req.and(StackReq::new::<u8>(4096)));
    kernel(&mut roomy, MemStack::new(&mut buf))
        .map_err(|e| TestCaseError::fail(format!("{what}: generous stack: {e}")))?;
    prop_assert_eq!(tight.bits(), roomy.bits(), "{}: results differ", what);
    Ok(())
}

fn check_scratch<T: Flt>(case: &ScratchCase) -> Result<(), TestCaseError> {
    let (d_in, d_out, n) = (case.d1, case.d2, case.n);
    let par: Par = par_of(case.rayon);
    let off = case.offset;
    let mut rg = Gen::new(case.seed);
    let x = Stored::<T>::from_m(&rg.matrix(n, d_in).round::<T>(), Layout::RowMajor, T::ZERO);
    let a = psd_factor::<T>(&mut rg, n, d_in, Kind::Uniform);
    let g = psd_factor::<T>(&mut rg, n, d_out, Kind::Uniform);
    let a_s = Stored::<T>::from_m(&a, Layout::ColMajor, T::ZERO);
    let g_s = Stored::<T>::from_m(&g, Layout::ColMajor, T::ZERO);
    let grad = Stored::<T>::from_m(
        &rg.matrix(d_out, d_in).round::<T>(),
        Layout::ColMajor,
        T::ZERO,
    );
    let damping = T::from_f64(0.1);

    // syrk_update with a bias (the only variant with scratch).
    let c = Stored::<T>::filled(d_in + 1, d_in + 1, Layout::ColMajor, T::ZERO);
    same_with_tight_stack(
        "syrk_update",
        syrk_update_scratch::<T>(n, d_in, true, par),
        off,
        &c,
        &|c, s| syrk_update(c.view_mut(), T::ONE, T::ONE, x.view(), true, par, s),
    )?;

    // conv2d_a_update.
    let (bn, ch, h, w) = (2, d_out.min(3), 3 + d_in % 4, 4);
    let img_data: Vec<T> = (0..bn * ch * h * w)
        .map(|_| T::from_f64(rg.uniform(-1.0, 1.0)))
        .collect();
    let img = ImageRef::nchw(&img_data, bn, ch, h, w).unwrap();
    let geom = Conv2dGeometry::new(bn, ch, h, w, 2, 3).padding(1, 0);
    let k = ch * 6 + 1;
    let fa = Stored::<T>::filled(k, k, Layout::ColMajor, T::ZERO);
    same_with_tight_stack(
        "conv2d_a_update",
        conv2d_a_update_scratch::<T>(&geom, true).unwrap(),
        off,
        &fa,
        &|f, s| {
            conv2d_a_update(
                f.view_mut(),
                T::ZERO,
                T::ONE,
                img,
                &geom,
                true,
                ConvNormalization::Kfc,
                par,
                s,
            )
        },
    )?;

    // sym_eigen (eigenvectors; eigenvalues compared separately below).
    let q0 = Stored::<T>::filled(d_in, d_in, Layout::ColMajor, T::ZERO);
    same_with_tight_stack(
        "sym_eigen",
        sym_eigen_scratch::<T>(d_in, par),
        off,
        &q0,
        &|q, s| {
            let mut l = vec![T::ZERO; d_in];
            sym_eigen(a_s.view(), &mut l, q.view_mut(), par, s)
        },
    )?;
    let mut la = vec![T::ZERO; d_in];
    let mut qa = q0.clone();
    let mut lg = vec![T::ZERO; d_out];
    let mut qg = Stored::<T>::filled(d_out, d_out, Layout::ColMajor, T::ZERO);
    let mut buf = MemBuffer::new(sym_eigen_scratch::<T>(d_in.max(d_out), par));
    sym_eigen(
        a_s.view(),
        &mut la,
        qa.view_mut(),
        par,
        MemStack::new(&mut buf),
    )
    .unwrap();
    sym_eigen(
        g_s.view(),
        &mut lg,
        qg.view_mut(),
        par,
        MemStack::new(&mut buf),
    )
    .unwrap();

    // precondition_eigen and the precomputed variant.
    same_with_tight_stack(
        "precondition_eigen",
        precondition_eigen_scratch::<T>(d_out, d_in, par),
        off,
        &grad,
        &|v, s| {
            precondition_eigen(
                v.view_mut(),
                qg.view(),
                &lg,
                qa.view(),
                &la,
                damping,
                par,
                s,
            )
        },
    )?;
    let mut den = Stored::<T>::filled(d_out, d_in, Layout::ColMajor, T::ZERO);
    eigen_inverse_denominators(den.view_mut(), &lg, &la, damping).unwrap();
    same_with_tight_stack(
        "precondition_eigen_precomputed",
        precondition_eigen_scratch::<T>(d_out, d_in, par),
        off,
        &grad,
        &|v, s| {
            precondition_eigen_precomputed(v.view_mut(), qg.view(), qa.view(), den.view(), par, s)
        },
    )?;

    // damped_inverse, precondition_inverse.
    let inv0 = Stored::<T>::filled(d_in, d_in, Layout::ColMajor, T::ZERO);
    same_with_tight_stack(
        "damped_inverse",
        damped_inverse_scratch::<T>(d_in, par),
        off,
        &inv0,
        &|o, s| damped_inverse(o.view_mut(), a_s.view(), damping, par, s),
    )?;
    let gi = Stored::<T>::from_m(&M::identity(d_out).scale(0.5), Layout::ColMajor, T::ZERO);
    same_with_tight_stack(
        "precondition_inverse",
        precondition_inverse_scratch::<T>(d_out, d_in, par),
        off,
        &grad,
        &|v, s| precondition_inverse(v.view_mut(), gi.view(), a_s.view(), par, s),
    )?;

    // kron_apply (A: d_in x d_in, B: d_out x d_out, X: d_out x d_in),
    // kron_damped_solve.
    let y0 = Stored::<T>::filled(d_out, d_in, Layout::ColMajor, T::ZERO);
    same_with_tight_stack(
        "kron_apply",
        kron_apply_scratch::<T>(d_out, d_in, par),
        off,
        &y0,
        &|y, s| kron_apply(y.view_mut(), a_s.view(), g_s.view(), grad.view(), par, s),
    )?;
    same_with_tight_stack(
        "kron_damped_solve",
        kron_damped_solve_scratch::<T>(d_out, d_in, par),
        off,
        &grad,
        &|v, s| kron_damped_solve(v.view_mut(), a_s.view(), g_s.view(), damping, par, s),
    )
}

both_types!(
    kernels_work_with_any_stack_that_holds_their_scratch,
    scratch_case(),
    check_scratch
);
