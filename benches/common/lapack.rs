//! The system LAPACK (`?syevd`), loaded at run time with `dlopen`: the
//! baseline of the eigensolver benches. Nothing links against it, so the
//! benches build on any machine; without a LAPACK the baseline rows are
//! skipped with a message. Debian: `apt-get install libopenblas0-pthread`
//! (or `libopenblas-dev`); another library is chosen with
//! `KFAC_BENCH_LAPACK=/path/to/liblapack.so`, including the OpenBLAS build
//! that scipy ships (`pip download scipy-openblas32`, unzip; its symbols
//! carry a `scipy_` prefix, found here).
//!
//! Check the core OpenBLAS reports (printed): Debian's 0.3.21 does not know
//! recent Xeons and falls back to its `Prescott` (SSE3) kernels, a baseline
//! 2x too slow; set `OPENBLAS_CORETYPE=SkylakeX` (or use scipy's build).

use std::ffi::{c_char, c_int, c_void, CStr, CString};

/// `?syevd_` with gfortran's hidden string lengths (ignored by C builds).
type SyevdFn<T> = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const c_int,
    *mut T,
    *const c_int,
    *mut T,
    *mut T,
    *const c_int,
    *mut c_int,
    *const c_int,
    *mut c_int,
    usize,
    usize,
);

/// `?syrk_` with gfortran's hidden string lengths (ignored by C builds).
type SyrkFn<T> = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const c_int,
    *const c_int,
    *const T,
    *const T,
    *const c_int,
    *const T,
    *mut T,
    *const c_int,
    usize,
    usize,
);

/// A loaded LAPACK: `ssyevd`, `dsyevd`, the BLAS `ssyrk`/`dsyrk` when the
/// library has them (OpenBLAS does) and, for OpenBLAS, its thread count
/// setter.
pub struct Lapack {
    /// The library's file name as loaded, its symbol prefix and core.
    pub name: String,
    ssyevd: SyevdFn<f32>,
    dsyevd: SyevdFn<f64>,
    ssyrk: Option<SyrkFn<f32>>,
    dsyrk: Option<SyrkFn<f64>>,
    set_threads: Option<unsafe extern "C" fn(c_int)>,
}

fn symbol(handle: *mut c_void, name: &CStr) -> *mut c_void {
    // SAFETY: a handle from dlopen and a NUL-terminated name.
    unsafe { libc::dlsym(handle, name.as_ptr()) }
}

impl Lapack {
    /// Loads `KFAC_BENCH_LAPACK`, else OpenBLAS, else the reference
    /// LAPACK; `None` (with a message on stderr) when none has `?syevd_`.
    pub fn load() -> Option<Lapack> {
        let candidates: Vec<String> = match std::env::var("KFAC_BENCH_LAPACK") {
            Ok(p) => vec![p],
            Err(_) => ["libopenblas.so.0", "libopenblas.so", "liblapack.so.3"]
                .map(String::from)
                .to_vec(),
        };
        for name in &candidates {
            let c = CString::new(name.as_str()).ok()?;
            // SAFETY: a NUL-terminated file name; the handle is never
            // closed (the functions are used until the process exits).
            let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if h.is_null() {
                continue;
            }
            for prefix in ["", "scipy_"] {
                let sym = |s: &str| symbol(h, &CString::new(format!("{prefix}{s}")).unwrap());
                let (s, d) = (sym("ssyevd_"), sym("dsyevd_"));
                if s.is_null() || d.is_null() {
                    continue;
                }
                let t = sym("openblas_set_num_threads");
                let (ss, ds) = (sym("ssyrk_"), sym("dsyrk_"));
                let core = sym("openblas_get_corename");
                let core = if core.is_null() {
                    String::from("-")
                } else {
                    // SAFETY: OpenBLAS's `char *openblas_get_corename(void)`
                    // returns a static NUL-terminated string.
                    unsafe {
                        let f = std::mem::transmute::<
                            *mut c_void,
                            unsafe extern "C" fn() -> *const c_char,
                        >(core);
                        CStr::from_ptr(f()).to_string_lossy().into_owned()
                    }
                };
                // SAFETY: the symbols are LAPACK's ?syevd_ and BLAS's ?syrk_
                // (the Fortran ABIs declared by SyevdFn and SyrkFn) and
                // OpenBLAS's `void f(int)`.
                return Some(unsafe {
                    Lapack {
                        name: format!("{name} ({prefix}?syevd_, core {core})"),
                        ssyevd: std::mem::transmute::<*mut c_void, SyevdFn<f32>>(s),
                        dsyevd: std::mem::transmute::<*mut c_void, SyevdFn<f64>>(d),
                        ssyrk: (!ss.is_null())
                            .then(|| std::mem::transmute::<*mut c_void, SyrkFn<f32>>(ss)),
                        dsyrk: (!ds.is_null())
                            .then(|| std::mem::transmute::<*mut c_void, SyrkFn<f64>>(ds)),
                        set_threads: (!t.is_null()).then(|| {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int)>(t)
                        }),
                    }
                });
            }
        }
        eprintln!(
            "no LAPACK with ssyevd_/dsyevd_ among {candidates:?}: the LAPACK baseline is \
             skipped (Debian: apt-get install libopenblas0-pthread)"
        );
        None
    }

    /// Sets OpenBLAS's thread count; `false` when the library has no such
    /// control (then its figures are single-threaded or its own choice).
    pub fn set_threads(&self, n: usize) -> bool {
        match self.set_threads {
            // SAFETY: OpenBLAS's setter takes any positive count.
            Some(f) => unsafe {
                f(n as c_int);
                true
            },
            None => false,
        }
    }
}

/// The element types with a LAPACK `?syevd`.
pub trait LapackReal: Copy + Default {
    /// Calls `?syevd_` (jobz `V`, uplo `L`) on the column-major `n x n`
    /// `a`; returns `info`.
    #[allow(clippy::too_many_arguments)]
    fn syevd(
        lib: &Lapack,
        n: c_int,
        a: &mut [Self],
        w: &mut [Self],
        work: &mut [Self],
        lwork: c_int,
        iwork: &mut [c_int],
        liwork: c_int,
    ) -> c_int;
    /// `C += alpha A A^T` on the lower triangle (`?syrk_`, uplo `L`, trans
    /// `N`): `A` column-major `n x k` (a row-major `k x n` matrix `X`, so
    /// `C = X^T X`), `C` column-major `n x n`. `false` when the library has
    /// no `?syrk_`.
    fn syrk(lib: &Lapack, n: usize, k: usize, alpha: Self, a: &[Self], c: &mut [Self]) -> bool;
    /// The workspace size a query returned.
    fn to_len(self) -> usize;
    /// Widens to `f64`.
    fn as_f64(self) -> f64;
    /// Machine epsilon, as `f64`.
    const EPS: f64;
}

macro_rules! lapack_real {
    ($t:ty, $f:ident, $syrk:ident) => {
        impl LapackReal for $t {
            fn syrk(
                lib: &Lapack,
                n: usize,
                k: usize,
                alpha: Self,
                a: &[Self],
                c: &mut [Self],
            ) -> bool {
                let Some(f) = lib.$syrk else {
                    return false;
                };
                assert!(a.len() >= n * k && c.len() >= n * n);
                let (ni, ki, ld) = (n as c_int, k as c_int, n.max(1) as c_int);
                // SAFETY: `a` holds `n x k` and `c` `n x n` column-major
                // values (asserted), the flags are valid strings.
                unsafe {
                    f(
                        c"L".as_ptr(),
                        c"N".as_ptr(),
                        &ni,
                        &ki,
                        &alpha,
                        a.as_ptr(),
                        &ld,
                        &1.0,
                        c.as_mut_ptr(),
                        &ld,
                        1,
                        1,
                    )
                };
                true
            }
            fn syevd(
                lib: &Lapack,
                n: c_int,
                a: &mut [Self],
                w: &mut [Self],
                work: &mut [Self],
                lwork: c_int,
                iwork: &mut [c_int],
                liwork: c_int,
            ) -> c_int {
                let nn = n.max(0) as usize;
                assert!(a.len() >= nn * nn && w.len() >= nn);
                assert!(
                    work.len() >= lwork.max(1) as usize && iwork.len() >= liwork.max(1) as usize
                );
                let mut info = 0;
                // SAFETY: every buffer holds what its size argument says
                // (checked above; -1 is a workspace query writing one
                // element of each), and the flags are valid strings.
                unsafe {
                    (lib.$f)(
                        c"V".as_ptr(),
                        c"L".as_ptr(),
                        &n,
                        a.as_mut_ptr(),
                        &n.max(1),
                        w.as_mut_ptr(),
                        work.as_mut_ptr(),
                        &lwork,
                        iwork.as_mut_ptr(),
                        &liwork,
                        &mut info,
                        1,
                        1,
                    )
                };
                info
            }
            fn to_len(self) -> usize {
                self as usize
            }
            fn as_f64(self) -> f64 {
                self as f64
            }
            const EPS: f64 = <$t>::EPSILON as f64;
        }
    };
}
lapack_real!(f32, ssyevd, ssyrk);
lapack_real!(f64, dsyevd, dsyrk);

/// Buffers for repeated `?syevd` calls of one size.
pub struct Syevd<T> {
    n: usize,
    /// The eigenvectors after [`Syevd::run`] (column-major).
    pub a: Vec<T>,
    /// The eigenvalues after [`Syevd::run`], ascending.
    pub w: Vec<T>,
    work: Vec<T>,
    iwork: Vec<c_int>,
}

impl<T: LapackReal> Syevd<T> {
    /// Queries and allocates the workspace for `n x n` problems.
    pub fn new(lib: &Lapack, n: usize) -> Self {
        let (mut wq, mut iwq) = ([T::default()], [0 as c_int]);
        let mut a = vec![T::default(); n * n];
        let mut w = vec![T::default(); n];
        let info = T::syevd(lib, n as c_int, &mut a, &mut w, &mut wq, -1, &mut iwq, -1);
        assert_eq!(info, 0, "?syevd workspace query");
        Syevd {
            n,
            a,
            w,
            work: vec![T::default(); wq[0].to_len().max(1)],
            iwork: vec![0; (iwq[0].max(1)) as usize],
        }
    }

    /// Eigenvalues and eigenvectors of the symmetric `n x n` matrix in
    /// column-major `src` (its lower triangle is read).
    pub fn run(&mut self, lib: &Lapack, src: &[T]) {
        self.a.copy_from_slice(&src[..self.n * self.n]);
        let (lw, liw) = (self.work.len() as c_int, self.iwork.len() as c_int);
        let info = T::syevd(
            lib,
            self.n as c_int,
            &mut self.a,
            &mut self.w,
            &mut self.work,
            lw,
            &mut self.iwork,
            liw,
        );
        assert_eq!(info, 0, "?syevd failed: info {info}");
    }

    /// Panics unless the eigenvalues of the last [`Syevd::run`] (clamped at
    /// zero, as kfac clamps) and `ours` agree within `64 n eps norm`
    /// (`norm` a norm of the matrix): otherwise the baseline does not
    /// compute what we do.
    pub fn assert_eigenvalues_match(&self, ours: &[f64], norm: f64, what: &str) {
        let tol = 64.0 * self.n as f64 * T::EPS * norm;
        for (k, (x, y)) in ours.iter().zip(&self.w).enumerate() {
            let y = y.as_f64().max(0.0);
            assert!(
                (x - y).abs() <= tol,
                "{what}: eigenvalue {k}: ours {x} vs LAPACK {y} (tol {tol:e})"
            );
        }
    }
}
