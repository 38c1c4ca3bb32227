//! A `#![no_std]` static library that calls every public kernel of
//! `kfac-kernels` built without its `std` feature. It exists only to be
//! compiled: if `std` leaks into the dependency graph, the build fails with a
//! duplicate `panic_impl` lang item.

#![no_std]

extern crate alloc;

use alloc::vec;
use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use kfac_kernels::conv::{self, Conv2dGeometry, ConvNormalization, ImageRef};
use kfac_kernels::faer::dyn_stack::{MemBuffer, MemStack};
use kfac_kernels::faer::{Mat, Par};
use kfac_kernels::{check, eigen, factor, inverse, kl, kron, packed, Real};

/// A bump allocator over a static arena (never frees): enough for a smoke
/// call, and it needs nothing from the platform.
struct Bump {
    arena: UnsafeCell<[u8; ARENA]>,
    next: AtomicUsize,
}

const ARENA: usize = 1 << 22;

// SAFETY: the arena is only handed out in disjoint ranges reserved with an
// atomic fetch_add, so concurrent callers never alias.
unsafe impl Sync for Bump {}

// SAFETY: `alloc` returns a pointer into the arena, aligned to
// `layout.align()`, to a range of `layout.size()` bytes reserved for this
// call only, or null when the arena is exhausted; `dealloc` is a no-op, which
// is allowed (memory is simply never reused).
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = self.arena.get() as usize;
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base + cur + layout.align() - 1) & !(layout.align() - 1);
            let end = start - base + layout.size();
            if end > ARENA {
                return core::ptr::null_mut();
            }
            match self
                .next
                .compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return start as *mut u8,
                Err(c) => cur = c,
            }
        }
    }
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static ALLOC: Bump = Bump {
    arena: UnsafeCell::new([0; ARENA]),
    next: AtomicUsize::new(0),
};

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The prebuilt `alloc` (compiled with unwinding) references this symbol;
/// with `panic = "abort"` nothing unwinds, so it is never called. Defined
/// only so the archive links into a plain C program.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

fn run<T: Real>() -> Result<(), kfac_kernels::Error> {
    let par = Par::Seq;
    let (n, d, dout) = (4usize, 3usize, 2usize);
    let x = Mat::<T>::from_fn(n, d, |i, j| T::from_usize(i + 2 * j + 1));
    let g = Mat::<T>::from_fn(n, dout, |i, j| T::from_usize(i * j + 1));
    let da = factor::factor_dim(d, true);

    // factor updates
    let mut a = Mat::<T>::zeros(da, da);
    let mut gf = Mat::<T>::zeros(dout, dout);
    let req = factor::syrk_update_scratch::<T>(n, d, true, par);
    let mut buf = MemBuffer::new(req);
    let stack = MemStack::new(&mut buf);
    factor::syrk_update(a.as_mut(), T::ZERO, T::ONE, x.as_ref(), true, par, stack)?;
    factor::running_average(a.as_mut(), T::from_f64(0.5), x.as_ref(), true, par, stack)?;
    let mut s = T::ONE;
    factor::running_average_lazy(
        a.as_mut(),
        &mut s,
        T::from_f64(0.9),
        x.as_ref(),
        true,
        par,
        stack,
    )?;
    factor::materialize_lazy(a.as_mut(), &mut s)?;
    factor::running_average(gf.as_mut(), T::ZERO, g.as_ref(), false, par, stack)?;
    factor::mirror_lower(a.as_mut())?;
    factor::mirror_lower(gf.as_mut())?;

    // conv2d statistics
    let img = vec![T::ONE; 2 * 3 * 5 * 5];
    let geom = Conv2dGeometry::new(2, 3, 5, 5, 3, 3)
        .stride(2, 2)
        .padding(1, 1)
        .dilation(1, 1);
    let (oh, ow) = geom.output_size()?;
    let k = geom.patch_len()? + 1;
    let mut ca = Mat::<T>::zeros(k, k);
    let mut cbuf = MemBuffer::new(conv::conv2d_a_update_scratch::<T>(&geom, true)?);
    for layout in [conv::ImageLayout::Nchw, conv::ImageLayout::Nhwc] {
        let input = ImageRef::new(&img, layout, 2, 3, 5, 5)?;
        conv::conv2d_a_update(
            ca.as_mut(),
            T::ZERO,
            T::ONE,
            input,
            &geom,
            true,
            ConvNormalization::Kfc,
            par,
            MemStack::new(&mut cbuf),
        )?;
    }
    let gout = vec![T::ONE; 2 * 4 * oh * ow];
    let mut cg = Mat::<T>::zeros(4, 4);
    let _ = conv::conv2d_g_update_scratch::<T>();
    conv::conv2d_g_update(
        cg.as_mut(),
        T::ZERO,
        T::ONE,
        ImageRef::with_strides(&gout, [2, 4, oh, ow], [4 * oh * ow, oh * ow, ow, 1])?,
        ConvNormalization::KfacPytorch,
        par,
    )?;

    // eigen method
    let mut qa = Mat::<T>::zeros(da, da);
    let mut la = vec![T::ZERO; da];
    let mut qg = Mat::<T>::zeros(dout, dout);
    let mut lg = vec![T::ZERO; dout];
    let mut ebuf = MemBuffer::new(
        eigen::sym_eigen_scratch::<T>(da, par)
            .or(eigen::precondition_eigen_scratch::<T>(dout, da, par))
            .or(inverse::damped_inverse_scratch::<T>(da, par))
            .or(inverse::precondition_inverse_scratch::<T>(dout, da, par))
            .or(kron::kron_apply_scratch::<T>(dout, da, par))
            .or(kron::kron_damped_solve_scratch::<T>(dout, da, par))
            .or(eigen::eigenbasis_drift_scratch::<T>(da, par))
            .or(eigen::refresh_eigenbasis_scratch::<T>(da, par))
            .or(eigen::eigenbasis_change_estimate_scratch::<T>(da, 4))
            .or(eigen::largest_eigenvalue_estimate_scratch(da)),
    );
    let st = MemStack::new(&mut ebuf);
    eigen::sym_eigen(a.as_ref(), &mut la, qa.as_mut(), par, st)?;
    eigen::sym_eigen(gf.as_ref(), &mut lg, qg.as_mut(), par, st)?;
    let _ = eigen::largest_eigenvalue_estimate(a.as_ref(), 4, st)?;
    // `a` is full (mirrored above).
    let mut l2 = vec![T::ZERO; da];
    let _ = eigen::eigenbasis_drift(a.as_ref(), qa.as_ref(), &mut l2, par, st)?;
    let _ = eigen::eigenbasis_change_estimate(a.as_ref(), qa.as_ref(), &la, 4, 1, par, st)?;
    let mut q2 = qa.clone();
    let _ = eigen::refresh_eigenbasis(a.as_ref(), q2.as_mut(), &mut l2, 0.0, 0.0, par, st)?;
    let mut grad = Mat::<T>::from_fn(dout, da, |i, j| T::from_usize(i + j));
    let damping = T::from_f64(0.01);
    eigen::precondition_eigen(
        grad.as_mut(),
        qg.as_ref(),
        &lg,
        qa.as_ref(),
        &la,
        damping,
        par,
        st,
    )?;
    let mut den = Mat::<T>::zeros(dout, da);
    eigen::eigen_inverse_denominators(den.as_mut(), &lg, &la, damping)?;
    eigen::precondition_eigen_precomputed(
        grad.as_mut(),
        qg.as_ref(),
        qa.as_ref(),
        den.as_ref(),
        par,
        st,
    )?;

    // inverse method
    let fd = inverse::factored_damping(a.as_ref(), gf.as_ref(), damping)?;
    let _ = inverse::tikhonov_pi(a.as_ref(), gf.as_ref())?;
    let mut ai = Mat::<T>::zeros(da, da);
    let mut gi = Mat::<T>::zeros(dout, dout);
    inverse::damped_inverse(ai.as_mut(), a.as_ref(), fd.a, par, st)?;
    inverse::damped_inverse(gi.as_mut(), gf.as_ref(), fd.g, par, st)?;
    inverse::precondition_inverse(grad.as_mut(), gi.as_ref(), ai.as_ref(), par, st)?;

    // Kronecker products
    let mut big = Mat::<T>::zeros(da * dout, da * dout);
    kron::kron(big.as_mut(), a.as_ref(), gf.as_ref())?;
    let mut y = Mat::<T>::zeros(dout, da);
    kron::kron_apply(y.as_mut(), a.as_ref(), gf.as_ref(), grad.as_ref(), par, st)?;
    kron::kron_damped_solve(y.as_mut(), a.as_ref(), gf.as_ref(), damping, par, st)?;

    // packed storage
    let len = packed::packed_len(da).unwrap_or(0);
    let mut p = vec![T::ZERO; len];
    packed::pack_lower(a.as_ref(), &mut p)?;
    let q = p.clone();
    packed::accumulate_packed(&mut p, &q, T::ONE)?;
    packed::add_packed_to_lower(&q, a.as_mut(), T::ONE)?;
    packed::unpack_lower(&p, a.as_mut(), true)?;
    let _ = packed::packed_index(da, 1, 0);

    // KL clipping
    let dot = kl::frobenius_dot(grad.as_ref(), y.as_ref())?;
    let _ = kl::kl_clip_scale(dot, T::from_f64(0.1), T::from_f64(0.001))?;

    runtime_math::<T>(
        a.as_ref(),
        gf.as_ref(),
        x.as_ref(),
        &img,
        &gout,
        &geom,
        (oh, ow),
    )?;
    Ok(())
}

/// The kernels the runtime's step uses for embedding (diagonal-A) layers,
/// running averages and once-only input validation.
fn runtime_math<T: Real>(
    a: kfac_kernels::faer::MatRef<'_, T>,
    gf: kfac_kernels::faer::MatRef<'_, T>,
    x: kfac_kernels::faer::MatRef<'_, T>,
    img: &[T],
    gout: &[T],
    geom: &Conv2dGeometry,
    (oh, ow): (usize, usize),
) -> Result<(), kfac_kernels::Error> {
    let par = Par::Seq;
    let (da, dout) = (a.nrows(), gf.nrows());

    // validation once, then the prechecked updates
    check::finite_slice("slice", img)?;
    let xc = check::finite_matrix("activations", x)?;
    let mut c = Mat::<T>::zeros(da, da);
    let mut buf = MemBuffer::new(factor::syrk_update_scratch::<T>(
        x.nrows(),
        x.ncols(),
        true,
        par,
    ));
    factor::syrk_update_prechecked(
        c.as_mut(),
        T::ZERO,
        T::ONE,
        xc,
        true,
        par,
        MemStack::new(&mut buf),
    )?;
    let k = geom.patch_len()? + 1;
    let mut ca = Mat::<T>::zeros(k, k);
    let mut cbuf = MemBuffer::new(conv::conv2d_a_update_scratch::<T>(geom, true)?);
    let input = check::finite_image(ImageRef::nchw(img, 2, 3, 5, 5)?)?;
    conv::conv2d_a_update_prechecked(
        ca.as_mut(),
        T::ZERO,
        T::ONE,
        input,
        geom,
        true,
        ConvNormalization::Kfc,
        par,
        MemStack::new(&mut cbuf),
    )?;
    let go = check::finite_image(ImageRef::nchw(gout, 2, 4, oh, ow)?)?;
    let mut cg = Mat::<T>::zeros(4, 4);
    conv::conv2d_g_update_prechecked(
        cg.as_mut(),
        T::ZERO,
        T::ONE,
        go,
        ConvNormalization::Kfc,
        par,
    )?;

    // accumulation and running average
    let mut acc = Mat::<T>::zeros(da, da);
    factor::accumulate_lower(acc.as_mut(), a, T::from_f64(2.0), true)?;
    factor::accumulate_lower(acc.as_mut(), a, T::ONE, false)?;
    let (xi, cf) = factor::running_average_coefficients::<T>(0.9, 3.0)?;
    let mut blended = Mat::<T>::zeros(da, da);
    factor::blend_lower_to_full(blended.as_mut(), a, acc.as_ref(), xi, cf)?;
    let mut dg = vec![T::ZERO; 5];
    factor::diag_token_counts_update(&mut dg, true, T::ONE, &[0, 4, 4, 1])?;
    let mut dblend = vec![T::ZERO; 5];
    factor::blend_diag(&mut dblend, &dg, &dg, xi, cf)?;

    // diagonal-A (embedding) eigen and inverse methods
    let mut la = vec![T::ZERO; 5];
    eigen::clamp_eigenvalues_diag(&mut la, &dblend)?;
    let mut qg = Mat::<T>::zeros(dout, dout);
    let mut lg = vec![T::ZERO; dout];
    let damping = T::from_f64(0.01);
    let mut ebuf = MemBuffer::new(
        eigen::sym_eigen_scratch::<T>(dout, par)
            .or(eigen::precondition_eigen_diag_a_scratch::<T>(dout, 5, par))
            .or(inverse::damped_inverse_scratch::<T>(dout, par))
            .or(inverse::precondition_inverse_diag_a_scratch::<T>(
                dout, 5, par,
            )),
    );
    let st = MemStack::new(&mut ebuf);
    eigen::sym_eigen(gf, &mut lg, qg.as_mut(), par, st)?;
    let mut v = Mat::<T>::from_fn(dout, 5, |i, j| T::from_usize(i + j));
    eigen::precondition_eigen_diag_a(v.as_mut(), qg.as_ref(), &lg, &la, damping, par, st)?;
    let mut den = Mat::<T>::zeros(dout, 5);
    eigen::eigen_inverse_denominators(den.as_mut(), &lg, &la, damping)?;
    eigen::precondition_eigen_diag_a_precomputed(v.as_mut(), qg.as_ref(), den.as_ref(), par, st)?;
    let fd = inverse::factored_damping_diag_a(&dblend, gf, damping)?;
    let mut ai = vec![T::ZERO; 5];
    inverse::damped_inverse_diag(&mut ai, &dblend, fd.a)?;
    let mut gi = Mat::<T>::zeros(dout, dout);
    inverse::damped_inverse(gi.as_mut(), gf, fd.g, par, st)?;
    inverse::precondition_inverse_diag_a(v.as_mut(), gi.as_ref(), &ai, par, st)?;
    Ok(())
}

fn wire() -> Result<(), kfac_kernels::Error> {
    let src = [1.0f32, 2.5, -3.0];
    let mut b = [packed::bf16::ZERO; 3];
    let mut h = [packed::f16::ZERO; 3];
    let mut back = [0.0f32; 3];
    packed::f32_to_bf16(&src, &mut b)?;
    packed::bf16_to_f32(&b, &mut back)?;
    packed::f32_to_f16(&src, &mut h)?;
    packed::f16_to_f32(&h, &mut back)?;
    Ok(())
}

/// Calls every public kernel in f32 and f64; returns 0 on success.
#[no_mangle]
pub extern "C" fn kfac_nostd_smoke() -> i32 {
    match (run::<f32>(), run::<f64>(), wire()) {
        (Ok(()), Ok(()), Ok(())) => 0,
        _ => 1,
    }
}
