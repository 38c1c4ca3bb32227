//! Properties of the kernels that took the runtime's hand-written math back
//! (issue #10 item 4): running-average blends, diagonal-A (embedding)
//! preconditioning, diagonal damped inverses and factored damping, token
//! counts, lower-triangle accumulation, and once-only validation with the
//! `*_prechecked` kernels.
//!
//! Two kinds of reference, both written here:
//! * a literal copy of the runtime's code as it stood before the kernels
//!   existed (`rt_*`, f32, same operation order): where the contract is
//!   bitwise equality, results are compared bit for bit;
//! * an independent naive reference in f64 (plain loops, an explicit dense
//!   Kronecker matrix solved by Gaussian elimination), with tolerances
//!   `c * k * eps * cond` derived from the dimension `k` and the condition
//!   number of the damped Kronecker factor.
//!
//! Self-contained on purpose (no shared `tests/common`).

// The references are plain index loops on purpose.
#![allow(clippy::needless_range_loop)]

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use kfac_kernels::conv::{self, Conv2dGeometry, ConvNormalization, ImageLayout, ImageRef};
use kfac_kernels::{check, eigen, factor, inverse, Error};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------

/// splitmix64: a tiny deterministic generator driven by a proptest seed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [-1, 1), scaled by a random power of two in [2^-6, 2^6]
    /// half of the time (so products and sums round non-trivially).
    fn val(&mut self) -> f64 {
        let v = 2.0 * self.unit() - 1.0;
        if self.next_u64() & 1 == 0 {
            v
        } else {
            v * 2f64.powi((self.next_u64() % 13) as i32 - 6)
        }
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn mat32(rng: &mut Rng, r: usize, c: usize) -> Mat<f32> {
    Mat::from_fn(r, c, |_, _| rng.val() as f32)
}

fn mat64(rng: &mut Rng, r: usize, c: usize) -> Mat<f64> {
    Mat::from_fn(r, c, |_, _| rng.val())
}

/// A random orthogonal matrix (modified Gram-Schmidt on a random matrix, in
/// f64). Each column is orthogonalized twice: one pass loses orthogonality
/// by about `eps / norm` when a column is nearly in the span of the earlier
/// ones, and the references below assume `Q^T Q = I` to a few ulps
/// ("twice is enough", Giraud et al. 2005).
fn orthogonal(rng: &mut Rng, n: usize) -> Mat<f64> {
    'draw: loop {
        let mut q = Mat::<f64>::from_fn(n, n, |_, _| 2.0 * rng.unit() - 1.0 + 1e-3);
        for j in 0..n {
            for _pass in 0..2 {
                for k in 0..j {
                    let d: f64 = (0..n).map(|i| q[(i, j)] * q[(i, k)]).sum();
                    for i in 0..n {
                        q[(i, j)] -= d * q[(i, k)];
                    }
                }
            }
            let nrm = (0..n).map(|i| q[(i, j)] * q[(i, j)]).sum::<f64>().sqrt();
            if nrm < 1e-3 {
                // Nearly dependent columns: draw again rather than patch a
                // column in that would not be orthogonal to the others.
                continue 'draw;
            }
            for i in 0..n {
                q[(i, j)] /= nrm;
            }
        }
        return q;
    }
}

fn buf(req: StackReq) -> MemBuffer {
    MemBuffer::new(req)
}

fn bits32(m: MatRef<'_, f32>) -> Vec<u32> {
    let mut v = Vec::with_capacity(m.nrows() * m.ncols());
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            v.push(m[(i, j)].to_bits());
        }
    }
    v
}

fn bits64(m: MatRef<'_, f64>) -> Vec<u64> {
    let mut v = Vec::with_capacity(m.nrows() * m.ncols());
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            v.push(m[(i, j)].to_bits());
        }
    }
    v
}

fn slice_bits32(s: &[f32]) -> Vec<u32> {
    s.iter().map(|v| v.to_bits()).collect()
}

fn ensure(ok: bool, msg: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if ok {
        Ok(())
    } else {
        Err(TestCaseError::fail(msg()))
    }
}

fn kerr(e: Error) -> TestCaseError {
    TestCaseError::fail(format!("kernel error: {e}"))
}

/// `max |x - y|` and `max |y|` over two equally shaped f64 matrices.
fn max_err(x: MatRef<'_, f64>, y: MatRef<'_, f64>) -> (f64, f64) {
    let (mut e, mut s) = (0.0f64, 0.0f64);
    for j in 0..x.ncols() {
        for i in 0..x.nrows() {
            e = e.max((x[(i, j)] - y[(i, j)]).abs());
            s = s.max(y[(i, j)].abs());
        }
    }
    (e, s)
}

fn widen(m: MatRef<'_, f32>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64)
}

// ---------------------------------------------------------------------------
// Literal copies of the runtime's code (kfac-runtime/src/preconditioner.rs,
// before it called these kernels). Do not "improve" them: they are the
// bitwise contract.
// ---------------------------------------------------------------------------

/// `combine`, dense branch.
fn rt_combine_dense(f: &Mat<f32>, acc: &Mat<f32>, weight: f64, xi: f64) -> Mat<f32> {
    let c = ((1.0 - xi) / weight) as f32;
    let xi = xi as f32;
    let n = f.nrows();
    let mut out = Mat::<f32>::zeros(n, n);
    for j in 0..n {
        for i in j..n {
            let v = xi * f[(i, j)] + c * acc[(i, j)];
            out[(i, j)] = v;
            out[(j, i)] = v;
        }
    }
    out
}

/// `combine`, diagonal branch.
fn rt_combine_diag(f: &[f32], acc: &[f32], weight: f64, xi: f64) -> Vec<f32> {
    let c = ((1.0 - xi) / weight) as f32;
    let xi = xi as f32;
    f.iter().zip(acc).map(|(&f, &a)| xi * f + c * a).collect()
}

/// `inverse_shifts`, native compat, `Factor::Diag` branch.
fn rt_inverse_shifts_diag(
    dv: &[f32],
    gm: &Mat<f32>,
    damping: f64,
) -> Result<inverse::FactoredDamping<f32>, Error> {
    let d32 = damping as f32;
    let mean = dv.iter().map(|&v| v as f64).sum::<f64>() / dv.len().max(1) as f64;
    let one = Mat::<f32>::from_fn(1, 1, |_, _| mean as f32);
    let tg = (0..gm.nrows()).map(|i| gm[(i, i)] as f64).sum::<f64>() / gm.nrows().max(1) as f64;
    let gone = Mat::<f32>::from_fn(1, 1, |_, _| tg as f32);
    inverse::factored_damping(one.as_ref(), gone.as_ref(), d32)
}

/// `invert_one`, `(Method::Inverse, Factor::Diag)`: `Err(pivot)`.
fn rt_invert_diag(dv: &[f32], shift: f32) -> Result<Vec<f32>, usize> {
    let mut out = Vec::with_capacity(dv.len());
    for (i, &v) in dv.iter().enumerate() {
        let s = v + shift;
        if s.is_nan() || s <= 0.0 {
            return Err(i);
        }
        out.push(1.0 / s);
    }
    Ok(out)
}

/// `invert_one`, `(Method::Eigen, Factor::Diag)`.
fn rt_eigen_diag(d: &[f32]) -> Vec<f32> {
    d.iter().map(|&v| v.max(0.0)).collect()
}

/// `precondition`, eigen cache with `qa = None` (diagonal A).
fn rt_precondition_eigen_diag_a(
    raw: &Mat<f32>,
    qg: &Mat<f32>,
    lg: &[f32],
    la: &[f32],
    denom: Option<&Mat<f32>>,
    damping: f64,
) -> Mat<f32> {
    let mut v = raw.clone();
    let (d_out, d) = (v.nrows(), v.ncols());
    let par = Par::Seq;
    let mut t = Mat::<f32>::zeros(d_out, d);
    matmul(
        t.as_mut(),
        Accum::Replace,
        qg.transpose(),
        raw.as_ref(),
        1.0,
        par,
    );
    for j in 0..d {
        for i in 0..d_out {
            let s = match denom {
                Some(den) => den[(i, j)],
                None => 1.0 / (lg[i] * la[j] + damping as f32),
            };
            t[(i, j)] *= s;
        }
    }
    matmul(
        v.as_mut(),
        Accum::Replace,
        qg.as_ref(),
        t.as_ref(),
        1.0,
        par,
    );
    v
}

/// `precondition`, inverse cache with `Factor::Diag(ai)`.
fn rt_precondition_inverse_diag_a(raw: &Mat<f32>, g_inv: &Mat<f32>, ai: &[f32]) -> Mat<f32> {
    let mut v = raw.clone();
    let (d_out, d) = (v.nrows(), v.ncols());
    matmul(
        v.as_mut(),
        Accum::Replace,
        g_inv.as_ref(),
        raw.as_ref(),
        1.0,
        Par::Seq,
    );
    for j in 0..d {
        for i in 0..d_out {
            v[(i, j)] *= ai[j];
        }
    }
    v
}

/// `observe_layer`, embedding diagonal update.
fn rt_token_counts(d: &mut [f32], first: bool, beta: f32, tokens: &[usize]) {
    if first {
        d.iter_mut().for_each(|v| *v = 0.0);
    }
    for &t in tokens {
        d[t] += beta;
    }
}

/// `observe_layer`, Kronecker lower-triangle accumulation.
fn rt_accumulate(dst: &mut Mat<f32>, src: MatRef<'_, f32>, beta: f32, first: bool) {
    for j in 0..src.ncols() {
        for i in j..src.nrows() {
            let v = beta * src[(i, j)];
            dst[(i, j)] = if first { v } else { dst[(i, j)] + v };
        }
    }
}

// ---------------------------------------------------------------------------
// Independent naive references (f64)
// ---------------------------------------------------------------------------

/// Solves `(diag(la) ⊗ G + damping I) vec(V) = vec(grad)` with an explicit
/// dense Kronecker matrix and Gaussian elimination with partial pivoting.
fn naive_kron_solve_diag_a(grad: &Mat<f64>, g: &Mat<f64>, la: &[f64], damping: f64) -> Mat<f64> {
    let (d_out, d_in) = (grad.nrows(), grad.ncols());
    let n = d_out * d_in;
    // vec stacks columns: index i + j * d_out.
    let mut k = vec![vec![0.0f64; n + 1]; n];
    for j in 0..d_in {
        for i in 0..d_out {
            let r = i + j * d_out;
            for kk in 0..d_out {
                k[r][kk + j * d_out] = la[j] * g[(i, kk)];
            }
            k[r][r] += damping;
            k[r][n] = grad[(i, j)];
        }
    }
    for col in 0..n {
        let p = (col..n)
            .max_by(|&a, &b| k[a][col].abs().total_cmp(&k[b][col].abs()))
            .unwrap();
        k.swap(col, p);
        for r in col + 1..n {
            let f = k[r][col] / k[col][col];
            if f != 0.0 {
                for c in col..=n {
                    k[r][c] -= f * k[col][c];
                }
            }
        }
    }
    let mut x = vec![0.0f64; n];
    for r in (0..n).rev() {
        let mut s = k[r][n];
        for c in r + 1..n {
            s -= k[r][c] * x[c];
        }
        x[r] = s / k[r][r];
    }
    Mat::from_fn(d_out, d_in, |i, j| x[i + j * d_out])
}

/// `G = Q diag(l) Q^T` in f64.
fn from_eigen(q: &Mat<f64>, l: &[f64]) -> Mat<f64> {
    let n = q.nrows();
    Mat::from_fn(n, n, |i, j| {
        (0..n).map(|k| q[(i, k)] * l[k] * q[(j, k)]).sum()
    })
}

/// A random eigen problem for a `d_out x d_in` diag-A layer: `Q_G`
/// (orthogonal), `l_G`, `l_A` in `[0, 4)` with some exact zeros, damping in
/// `[1e-2, 1]`.
struct DiagAProblem {
    qg: Mat<f64>,
    lg: Vec<f64>,
    la: Vec<f64>,
    grad: Mat<f64>,
    damping: f64,
}

fn diag_a_problem(rng: &mut Rng, d_out: usize, d_in: usize) -> DiagAProblem {
    let ev = |rng: &mut Rng| {
        if rng.below(5) == 0 {
            0.0
        } else {
            4.0 * rng.unit()
        }
    };
    DiagAProblem {
        qg: orthogonal(rng, d_out),
        lg: (0..d_out).map(|_| ev(rng)).collect(),
        la: (0..d_in).map(|_| ev(rng)).collect(),
        grad: mat64(rng, d_out, d_in),
        damping: 10f64.powf(-2.0 * rng.unit()),
    }
}

/// The condition number of `diag(la) ⊗ G + damping I`.
fn cond(p: &DiagAProblem) -> f64 {
    let mx = |l: &[f64]| l.iter().cloned().fold(0.0, f64::max);
    let mn = |l: &[f64]| l.iter().cloned().fold(f64::INFINITY, f64::min);
    (mx(&p.lg) * mx(&p.la) + p.damping) / (mn(&p.lg) * mn(&p.la) + p.damping)
}

// ---------------------------------------------------------------------------
// Running-average blend
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// `blend_lower_to_full` with the runtime's coefficients is the runtime's
    /// `combine` bit for bit (column-major storage), and every strided
    /// layout gives the same bits.
    #[test]
    fn blend_lower_to_full_is_bitwise_runtime_combine(
        seed in any::<u64>(), n in 0usize..48, xi in 0.0f64..1.0, weight in 1u32..5000,
        transposed in any::<bool>(),
    ) {
        let mut rng = Rng(seed);
        let f0 = mat32(&mut rng, n, n);
        let f = Mat::<f32>::from_fn(n, n, |i, j| if i >= j { f0[(i, j)] } else { f0[(j, i)] });
        let acc = mat32(&mut rng, n, n);
        let weight = weight as f64;
        let want = rt_combine_dense(&f, &acc, weight, xi);
        let (x, c) = factor::running_average_coefficients::<f32>(xi, weight).map_err(kerr)?;
        let mut out = Mat::<f32>::from_fn(n, n, |_, _| f32::NAN);
        if transposed {
            // Row-major views of every operand (the non-contiguous path).
            let ft = f.transpose().to_owned();
            let at = acc.transpose().to_owned();
            let mut ot = Mat::<f32>::zeros(n, n);
            factor::blend_lower_to_full(ot.as_mut().transpose_mut(), ft.transpose(), at.transpose(), x, c)
                .map_err(kerr)?;
            out.copy_from(ot.transpose());
        } else {
            factor::blend_lower_to_full(out.as_mut(), f.as_ref(), acc.as_ref(), x, c).map_err(kerr)?;
        }
        ensure(bits32(out.as_ref()) == bits32(want.as_ref()), || format!("n = {n}: blend differs from runtime combine"))?;
    }

    /// f64 blend against the naive formula (exact: the same two roundings).
    #[test]
    fn blend_lower_to_full_matches_naive_f64(seed in any::<u64>(), n in 0usize..24, xi in 0.0f64..1.0, c in 0.0f64..2.0) {
        let mut rng = Rng(seed);
        let f = mat64(&mut rng, n, n);
        let acc = mat64(&mut rng, n, n);
        let mut out = Mat::<f64>::zeros(n, n);
        factor::blend_lower_to_full(out.as_mut(), f.as_ref(), acc.as_ref(), xi, c).map_err(kerr)?;
        for j in 0..n {
            for i in 0..n {
                let (r, s) = if i >= j { (i, j) } else { (j, i) };
                let want = xi * f[(r, s)] + c * acc[(r, s)];
                ensure(out[(i, j)].to_bits() == want.to_bits(), || format!("({i}, {j})"))?;
            }
        }
    }

    /// A non-finite input (in the lower triangle) or an overflowing result
    /// is refused with its position; the inputs are untouched. Bad
    /// parameters and shapes leave `out` untouched.
    #[test]
    fn blend_refuses_non_finite_results(seed in any::<u64>(), n in 1usize..20, kind in 0u8..3) {
        let mut rng = Rng(seed);
        let mut f = mat32(&mut rng, n, n);
        let mut acc = mat32(&mut rng, n, n);
        let (i, j) = { let a = rng.below(n); let b = rng.below(n); (a.max(b), a.min(b)) };
        match kind {
            0 => f[(i, j)] = f32::NAN,
            1 => acc[(i, j)] = f32::INFINITY,
            _ => { f[(i, j)] = f32::MAX; acc[(i, j)] = f32::MAX; }
        }
        let (fb, ab) = (bits32(f.as_ref()), bits32(acc.as_ref()));
        let mut out = Mat::<f32>::zeros(n, n);
        let r = factor::blend_lower_to_full(out.as_mut(), f.as_ref(), acc.as_ref(), 1.0, 1.0);
        ensure(r == Err(Error::NonFinite { what: "blended factor", row: i, col: j }), || format!("{r:?} at ({i}, {j})"))?;
        ensure(bits32(f.as_ref()) == fb && bits32(acc.as_ref()) == ab, || "inputs modified".into())?;
        // Argument errors: out untouched.
        let mut out = Mat::<f32>::from_fn(n, n, |a, b| (a * n + b) as f32);
        let before = bits32(out.as_ref());
        let f = mat32(&mut rng, n, n);
        let acc = mat32(&mut rng, n, n);
        prop_assert!(factor::blend_lower_to_full(out.as_mut(), f.as_ref(), acc.as_ref(), f32::NAN, 1.0).is_err());
        prop_assert!(factor::blend_lower_to_full(out.as_mut(), f.as_ref(), acc.as_ref(), 0.5, f32::INFINITY).is_err());
        let small = Mat::<f32>::zeros(n, n + 1);
        prop_assert!(
            matches!(
                factor::blend_lower_to_full(out.as_mut(), f.as_ref(), small.as_ref(), 0.5, 0.5),
                Err(Error::DimensionMismatch { .. })
            ),
            "shape"
        );
        ensure(bits32(out.as_ref()) == before, || "out modified on an argument error".into())?;
    }

    /// `blend_diag` is the runtime's diagonal `combine` bit for bit, and
    /// refuses a non-finite result with its index.
    #[test]
    fn blend_diag_is_bitwise_runtime_combine(seed in any::<u64>(), n in 0usize..300, xi in 0.0f64..1.0, weight in 1u32..5000, bad in any::<bool>()) {
        let mut rng = Rng(seed);
        let f: Vec<f32> = (0..n).map(|_| rng.val() as f32).collect();
        let mut acc: Vec<f32> = (0..n).map(|_| rng.val() as f32).collect();
        let want = rt_combine_diag(&f, &acc, weight as f64, xi);
        let (x, c) = factor::running_average_coefficients::<f32>(xi, weight as f64).map_err(kerr)?;
        let mut out = vec![f32::NAN; n];
        if bad && n > 0 {
            let i = rng.below(n);
            acc[i] = f32::NAN;
            let r = factor::blend_diag(&mut out, &f, &acc, x, c);
            ensure(r == Err(Error::NonFinite { what: "blended diagonal factor", row: i, col: 0 }), || format!("{r:?}"))?;
        } else {
            factor::blend_diag(&mut out, &f, &acc, x, c).map_err(kerr)?;
            ensure(slice_bits32(&out) == slice_bits32(&want), || "diag blend differs".into())?;
        }
        let mut short = vec![0.0f32; n + 1];
        prop_assert!(
            matches!(factor::blend_diag(&mut short, &f, &acc, x, c), Err(Error::LengthMismatch { .. })),
            "length"
        );
        prop_assert!(short.iter().all(|&v| v == 0.0));
    }
}

#[test]
fn running_average_coefficients_are_the_runtime_casts() {
    for (xi, w) in [(0.0, 1.0), (0.95, 32.0), (1.0 / 3.0, 7.0), (0.999, 1e6)] {
        let (x, c) = factor::running_average_coefficients::<f32>(xi, w).unwrap();
        assert_eq!(x.to_bits(), (xi as f32).to_bits());
        assert_eq!(c.to_bits(), (((1.0 - xi) / w) as f32).to_bits());
        let (x, c) = factor::running_average_coefficients::<f64>(xi, w).unwrap();
        assert_eq!((x, c), (xi, (1.0 - xi) / w));
    }
    assert!(factor::running_average_coefficients::<f32>(0.5, 0.0).is_err());
    assert!(factor::running_average_coefficients::<f32>(f64::NAN, 1.0).is_err());
    assert!(factor::running_average_coefficients::<f32>(0.5, 1e-300).is_err());
}

// ---------------------------------------------------------------------------
// Diagonal-A eigen preconditioning
// ---------------------------------------------------------------------------

fn f32_problem(p: &DiagAProblem) -> (Mat<f32>, Vec<f32>, Vec<f32>, Mat<f32>, f32) {
    (
        Mat::from_fn(p.qg.nrows(), p.qg.ncols(), |i, j| p.qg[(i, j)] as f32),
        p.lg.iter().map(|&v| v as f32).collect(),
        p.la.iter().map(|&v| v as f32).collect(),
        Mat::from_fn(p.grad.nrows(), p.grad.ncols(), |i, j| p.grad[(i, j)] as f32),
        p.damping as f32,
    )
}

fn run_eigen_diag_a(
    v: &mut Mat<f32>,
    qg: &Mat<f32>,
    lg: &[f32],
    la: &[f32],
    den: Option<&Mat<f32>>,
    damping: f32,
) -> Result<(), Error> {
    let (d_out, d_in) = (v.nrows(), v.ncols());
    let mut b = buf(eigen::precondition_eigen_diag_a_scratch::<f32>(
        d_out,
        d_in,
        Par::Seq,
    ));
    let st = MemStack::new(&mut b);
    match den {
        Some(den) => eigen::precondition_eigen_diag_a_precomputed(
            v.as_mut(),
            qg.as_ref(),
            den.as_ref(),
            Par::Seq,
            st,
        ),
        None => {
            eigen::precondition_eigen_diag_a(v.as_mut(), qg.as_ref(), lg, la, damping, Par::Seq, st)
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// Both diag-A eigen kernels are bitwise the runtime's `precondition`
    /// (diagonal-A branch) on column-major gradients.
    #[test]
    fn eigen_diag_a_is_bitwise_runtime(seed in any::<u64>(), d_out in 0usize..40, d_in in 0usize..40, pre in any::<bool>()) {
        let mut rng = Rng(seed);
        let p = diag_a_problem(&mut rng, d_out, d_in);
        let (qg, lg, la, raw, damping) = f32_problem(&p);
        let den = if pre {
            let mut d = Mat::<f32>::zeros(d_out, d_in);
            eigen::eigen_inverse_denominators(d.as_mut(), &lg, &la, damping).map_err(kerr)?;
            Some(d)
        } else { None };
        let want = rt_precondition_eigen_diag_a(&raw, &qg, &lg, &la, den.as_ref(), p.damping as f32 as f64);
        let mut v = raw.clone();
        run_eigen_diag_a(&mut v, &qg, &lg, &la, den.as_ref(), damping).map_err(kerr)?;
        ensure(bits32(v.as_ref()) == bits32(want.as_ref()), || format!("{d_out}x{d_in} pre={pre}: differs from runtime"))?;
    }

    /// Diag-A eigen preconditioning solves `(diag(l_A) ⊗ G + damping I) vec(V) = vec(grad)`
    /// (explicit dense Kronecker matrix, f64 elimination), in f32 and f64,
    /// and agrees with the dense eigen kernel with `Q_A = I`.
    #[test]
    fn eigen_diag_a_matches_dense_kron_solve(seed in any::<u64>(), d_out in 1usize..7, d_in in 1usize..7, row_major in any::<bool>()) {
        let mut rng = Rng(seed);
        let p = diag_a_problem(&mut rng, d_out, d_in);
        let (qg, lg, la, grad, damping) = f32_problem(&p);
        // Reference from the f32-rounded inputs (Q_G as rounded is orthogonal to ~eps32).
        let qg64 = widen(qg.as_ref());
        let lg64: Vec<f64> = lg.iter().map(|&v| v as f64).collect();
        let la64: Vec<f64> = la.iter().map(|&v| v as f64).collect();
        let g = from_eigen(&qg64, &lg64);
        let want = naive_kron_solve_diag_a(&widen(grad.as_ref()), &g, &la64, damping as f64);
        let k = (d_out + d_in) as f64;
        let tol32 = 16.0 * k * f32::EPSILON as f64 * cond(&p);
        // f32, either layout of the gradient.
        let mut v = Mat::<f32>::zeros(d_out, d_in);
        let mut b = buf(eigen::precondition_eigen_diag_a_scratch::<f32>(d_out, d_in, Par::Seq));
        if row_major {
            let mut t = grad.transpose().to_owned();
            eigen::precondition_eigen_diag_a(t.as_mut().transpose_mut(), qg.as_ref(), &lg, &la, damping, Par::Seq, MemStack::new(&mut b)).map_err(kerr)?;
            v.copy_from(t.transpose());
        } else {
            v.copy_from(grad.as_ref());
            eigen::precondition_eigen_diag_a(v.as_mut(), qg.as_ref(), &lg, &la, damping, Par::Seq, MemStack::new(&mut b)).map_err(kerr)?;
        }
        let (e, s) = max_err(widen(v.as_ref()).as_ref(), want.as_ref());
        ensure(e <= tol32 * s.max(1e-30), || format!("f32: err {e} > {tol32} * {s}"))?;
        // The dense eigen kernel with Q_A = I.
        let mut vd = grad.clone();
        let qa = Mat::<f32>::identity(d_in, d_in);
        let mut bd = buf(eigen::precondition_eigen_scratch::<f32>(d_out, d_in, Par::Seq));
        eigen::precondition_eigen(vd.as_mut(), qg.as_ref(), &lg, qa.as_ref(), &la, damping, Par::Seq, MemStack::new(&mut bd)).map_err(kerr)?;
        let (e, s) = max_err(widen(v.as_ref()).as_ref(), widen(vd.as_ref()).as_ref());
        ensure(e <= tol32 * s.max(1e-30), || format!("vs dense eigen: err {e} > {tol32} * {s}"))?;
        // f64 kernel, against the reference from the f64 inputs.
        let g = from_eigen(&p.qg, &p.lg);
        let want = naive_kron_solve_diag_a(&p.grad, &g, &p.la, p.damping);
        let mut v = p.grad.clone();
        let mut b = buf(eigen::precondition_eigen_diag_a_scratch::<f64>(d_out, d_in, Par::Seq));
        eigen::precondition_eigen_diag_a(v.as_mut(), p.qg.as_ref(), &p.lg, &p.la, p.damping, Par::Seq, MemStack::new(&mut b)).map_err(kerr)?;
        let tol64 = 16.0 * k * f64::EPSILON * cond(&p);
        let (e, s) = max_err(v.as_ref(), want.as_ref());
        ensure(e <= tol64 * s.max(1e-300), || format!("f64: err {e} > {tol64} * {s}"))?;
        // Precomputed denominators: same as on the fly up to the one rounding of 1/x.
        let mut den = Mat::<f64>::zeros(d_out, d_in);
        eigen::eigen_inverse_denominators(den.as_mut(), &p.lg, &p.la, p.damping).map_err(kerr)?;
        let mut vp = p.grad.clone();
        eigen::precondition_eigen_diag_a_precomputed(vp.as_mut(), p.qg.as_ref(), den.as_ref(), Par::Seq, MemStack::new(&mut b)).map_err(kerr)?;
        ensure(bits64(vp.as_ref()) == bits64(v.as_ref()), || "precomputed differs from on-the-fly".into())?;
    }

    /// Bad shapes, NaN gradients, negative eigenvalues, bad damping and a
    /// small stack are refused and leave the gradient untouched.
    #[test]
    fn eigen_diag_a_errors_leave_grad_untouched(seed in any::<u64>(), d_out in 1usize..6, d_in in 1usize..6, which in 0u8..7) {
        let mut rng = Rng(seed);
        let p = diag_a_problem(&mut rng, d_out, d_in);
        let (qg, mut lg, mut la, mut grad, mut damping) = f32_problem(&p);
        let mut qg = qg;
        let mut stack_bytes = usize::MAX;
        match which {
            0 => grad[(rng.below(d_out), rng.below(d_in))] = f32::NAN,
            1 => lg[rng.below(d_out)] = -1.0,
            2 => la.push(1.0),
            3 => damping = 0.0,
            4 => qg = Mat::zeros(d_out + 1, d_out + 1),
            5 => la[rng.below(d_in)] = f32::INFINITY,
            _ => stack_bytes = 0,
        }
        let before = bits32(grad.as_ref());
        let req = eigen::precondition_eigen_diag_a_scratch::<f32>(d_out, d_in, Par::Seq);
        let mut b = if stack_bytes == 0 { buf(StackReq::EMPTY) } else { buf(req) };
        let r = eigen::precondition_eigen_diag_a(grad.as_mut(), qg.as_ref(), &lg, &la, damping, Par::Seq, MemStack::new(&mut b));
        prop_assert!(r.is_err(), "case {} accepted", which);
        ensure(bits32(grad.as_ref()) == before, || format!("case {which}: grad modified"))?;
        if which == 0 || which == 4 || which == 6 {
            let den = Mat::<f32>::from_fn(d_out, d_in, |_, _| 0.5);
            let r = eigen::precondition_eigen_diag_a_precomputed(grad.as_mut(), qg.as_ref(), den.as_ref(), Par::Seq, MemStack::new(&mut b));
            prop_assert!(r.is_err());
            ensure(bits32(grad.as_ref()) == before, || "precomputed: grad modified".into())?;
        }
    }

    /// The diagonal factor's eigen "decomposition" is the runtime's
    /// `max(0)`; NaN/Inf is refused with `out` untouched.
    #[test]
    fn clamp_eigenvalues_diag_is_runtime_max(seed in any::<u64>(), n in 0usize..100) {
        let mut rng = Rng(seed);
        let mut d: Vec<f32> = (0..n).map(|_| rng.val() as f32).collect();
        if n > 2 { d[0] = -0.0; d[1] = 0.0; }
        let mut out = vec![7.0f32; n];
        eigen::clamp_eigenvalues_diag(&mut out, &d).map_err(kerr)?;
        ensure(slice_bits32(&out) == slice_bits32(&rt_eigen_diag(&d)), || "clamp differs".into())?;
        if n > 0 {
            let i = rng.below(n);
            d[i] = f32::NAN;
            let mut out = vec![7.0f32; n];
            prop_assert_eq!(eigen::clamp_eigenvalues_diag(&mut out, &d), Err(Error::NonFinite { what: "diagonal factor", row: i, col: 0 }));
            prop_assert!(out.iter().all(|&v| v == 7.0));
        }
    }
}

#[test]
fn eigen_diag_a_is_bitwise_runtime_at_blocking_sizes() {
    // Sizes past faer's small-matrix paths and register/cache block edges.
    for &(d_out, d_in) in &[(1, 300), (300, 1), (64, 64), (65, 129), (97, 160)] {
        let mut rng = Rng(d_out as u64 * 1000 + d_in as u64);
        let p = diag_a_problem(&mut rng, d_out, d_in);
        let (qg, lg, la, raw, damping) = f32_problem(&p);
        let mut den = Mat::<f32>::zeros(d_out, d_in);
        eigen::eigen_inverse_denominators(den.as_mut(), &lg, &la, damping).unwrap();
        for pre in [false, true] {
            let den = pre.then_some(&den);
            let want = rt_precondition_eigen_diag_a(&raw, &qg, &lg, &la, den, damping as f64);
            let mut v = raw.clone();
            run_eigen_diag_a(&mut v, &qg, &lg, &la, den, damping).unwrap();
            assert_eq!(
                bits32(v.as_ref()),
                bits32(want.as_ref()),
                "{d_out}x{d_in} pre={pre}"
            );
        }
        let g_inv = mat32(&mut rng, d_out, d_out);
        let ai: Vec<f32> = (0..d_in).map(|_| rng.unit() as f32).collect();
        let want = rt_precondition_inverse_diag_a(&raw, &g_inv, &ai);
        let mut v = raw.clone();
        let mut b = buf(inverse::precondition_inverse_diag_a_scratch::<f32>(
            d_out,
            d_in,
            Par::Seq,
        ));
        inverse::precondition_inverse_diag_a(
            v.as_mut(),
            g_inv.as_ref(),
            &ai,
            Par::Seq,
            MemStack::new(&mut b),
        )
        .unwrap();
        assert_eq!(
            bits32(v.as_ref()),
            bits32(want.as_ref()),
            "inverse {d_out}x{d_in}"
        );
    }
}

// ---------------------------------------------------------------------------
// Diagonal-A inverse method
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// `precondition_inverse_diag_a` is bitwise the runtime's diagonal-A
    /// inverse branch, and `G_inv grad diag(a_inv)` by naive f64 loops
    /// within `2 d_out eps`.
    #[test]
    fn inverse_diag_a_is_bitwise_runtime_and_naive(seed in any::<u64>(), d_out in 0usize..40, d_in in 0usize..40, row_major in any::<bool>()) {
        let mut rng = Rng(seed);
        let raw = mat32(&mut rng, d_out, d_in);
        let g_inv = mat32(&mut rng, d_out, d_out);
        let ai: Vec<f32> = (0..d_in).map(|_| rng.val() as f32).collect();
        let want = rt_precondition_inverse_diag_a(&raw, &g_inv, &ai);
        let mut b = buf(inverse::precondition_inverse_diag_a_scratch::<f32>(d_out, d_in, Par::Seq));
        let mut v = raw.clone();
        inverse::precondition_inverse_diag_a(v.as_mut(), g_inv.as_ref(), &ai, Par::Seq, MemStack::new(&mut b)).map_err(kerr)?;
        ensure(bits32(v.as_ref()) == bits32(want.as_ref()), || format!("{d_out}x{d_in}: differs from runtime"))?;
        // Naive reference, any layout.
        let mut w = raw.transpose().to_owned();
        let vm = if row_major {
            inverse::precondition_inverse_diag_a(w.as_mut().transpose_mut(), g_inv.as_ref(), &ai, Par::Seq, MemStack::new(&mut b)).map_err(kerr)?;
            widen(w.transpose())
        } else {
            widen(v.as_ref())
        };
        for j in 0..d_in {
            for i in 0..d_out {
                let (mut s, mut sa) = (0.0f64, 0.0f64);
                for k in 0..d_out {
                    let t = g_inv[(i, k)] as f64 * raw[(k, j)] as f64;
                    s += t;
                    sa += t.abs();
                }
                let r = s * ai[j] as f64;
                let tol = 2.0 * (d_out as f64 + 1.0) * f32::EPSILON as f64 * sa * (ai[j] as f64).abs();
                ensure((vm[(i, j)] - r).abs() <= tol, || format!("({i}, {j}): {} vs {r}", vm[(i, j)]))?;
            }
        }
    }

    /// Errors (shapes, NaN, short stack) leave the gradient untouched.
    #[test]
    fn inverse_diag_a_errors_leave_grad_untouched(seed in any::<u64>(), d_out in 1usize..6, d_in in 1usize..6, which in 0u8..5) {
        let mut rng = Rng(seed);
        let mut grad = mat32(&mut rng, d_out, d_in);
        let mut g_inv = mat32(&mut rng, d_out, d_out);
        let mut ai: Vec<f32> = (0..d_in).map(|_| rng.val() as f32).collect();
        let mut small = false;
        match which {
            0 => grad[(rng.below(d_out), rng.below(d_in))] = f32::INFINITY,
            1 => g_inv = Mat::zeros(d_out, d_out + 1),
            2 => { ai.pop(); }
            3 => ai[rng.below(d_in)] = f32::NAN,
            _ => small = true,
        }
        let before = bits32(grad.as_ref());
        let mut b = if small { buf(StackReq::EMPTY) } else { buf(inverse::precondition_inverse_diag_a_scratch::<f32>(d_out, d_in, Par::Seq)) };
        let r = inverse::precondition_inverse_diag_a(grad.as_mut(), g_inv.as_ref(), &ai, Par::Seq, MemStack::new(&mut b));
        prop_assert!(r.is_err(), "case {} accepted", which);
        ensure(bits32(grad.as_ref()) == before, || "grad modified".into())?;
    }

    /// `damped_inverse_diag` is the runtime's `invert_one` diagonal branch:
    /// the same bits, the same first failing pivot, `out` untouched on error.
    #[test]
    fn damped_inverse_diag_is_runtime_invert(seed in any::<u64>(), n in 0usize..64, shift in 0.0f32..1.0, bad in 0u8..4) {
        let mut rng = Rng(seed);
        let mut d: Vec<f32> = (0..n).map(|_| 4.0 * rng.unit() as f32).collect();
        if n > 0 {
            match bad {
                1 => d[rng.below(n)] = -shift - 1.0,
                2 => d[rng.below(n)] = f32::NAN,
                3 => d[rng.below(n)] = -shift, // exactly 0 after the shift
                _ => {}
            }
        }
        let mut out = vec![3.0f32; n];
        let r = inverse::damped_inverse_diag(&mut out, &d, shift);
        match rt_invert_diag(&d, shift) {
            Ok(want) => {
                prop_assert!(r.is_ok(), "{:?}", r);
                ensure(slice_bits32(&out) == slice_bits32(&want), || "values differ".into())?;
                for (i, &v) in d.iter().enumerate() {
                    ensure(out[i] as f64 == (1.0 / (v + shift)) as f64, || "naive".into())?;
                }
            }
            Err(pivot) => {
                prop_assert_eq!(r, Err(Error::NotPositiveDefinite { what: "damped diagonal factor", pivot, dim: n }));
                prop_assert!(out.iter().all(|&v| v == 3.0));
            }
        }
    }

    /// `factored_damping_diag_a` is bitwise the runtime's 1x1-matrix
    /// construction (f32), and in f64 agrees with the dense
    /// `factored_damping` of `diag(a)` to a few ulps.
    #[test]
    fn factored_damping_diag_a_is_bitwise_runtime(seed in any::<u64>(), da in 0usize..300, dg in 0usize..20, damping in 1e-6f64..10.0, zero in any::<bool>()) {
        let mut rng = Rng(seed);
        let a: Vec<f32> = (0..da).map(|_| if zero { 0.0 } else { 8.0 * rng.unit() as f32 }).collect();
        let g = Mat::<f32>::from_fn(dg, dg, |i, j| if i == j { 4.0 * rng.unit() as f32 } else { rng.val() as f32 });
        let want = rt_inverse_shifts_diag(&a, &g, damping).map_err(kerr)?;
        let got = inverse::factored_damping_diag_a(&a, g.as_ref(), damping as f32).map_err(kerr)?;
        ensure(
            (got.pi.to_bits(), got.a.to_bits(), got.g.to_bits()) == (want.pi.to_bits(), want.a.to_bits(), want.g.to_bits()),
            || format!("{got:?} vs {want:?}"),
        )?;
        let a64: Vec<f64> = (0..da).map(|_| 8.0 * rng.unit()).collect();
        let g64 = widen(g.as_ref());
        let dense_a = Mat::<f64>::from_fn(da, da, |i, j| if i == j { a64[i] } else { 0.0 });
        let got = inverse::factored_damping_diag_a(&a64, g64.as_ref(), damping).map_err(kerr)?;
        let want = inverse::factored_damping(dense_a.as_ref(), g64.as_ref(), damping).map_err(kerr)?;
        let tol = 4.0 * (da + dg + 4) as f64 * f64::EPSILON;
        ensure((got.pi - want.pi).abs() <= tol * want.pi, || format!("{got:?} vs {want:?}"))?;
        ensure((got.a - want.a).abs() <= tol * want.a && (got.g - want.g).abs() <= tol * want.g, || format!("{got:?} vs {want:?}"))?;
    }
}

#[test]
fn factored_damping_diag_a_errors() {
    let g = Mat::<f32>::identity(2, 2);
    assert!(matches!(
        inverse::factored_damping_diag_a(&[1.0f32], Mat::<f32>::zeros(2, 3).as_ref(), 0.1),
        Err(Error::DimensionMismatch { .. })
    ));
    assert!(inverse::factored_damping_diag_a(&[1.0f32], g.as_ref(), 0.0).is_err());
    // The mean is taken in f64: f32::MAX entries do not overflow it.
    let big = [f32::MAX, f32::MAX];
    let got = inverse::factored_damping_diag_a(&big, g.as_ref(), 0.1).unwrap();
    assert_eq!(got, rt_inverse_shifts_diag(&big, &g, 0.1).unwrap());
    // A non-finite mean is refused, as in the runtime.
    for bad in [f32::INFINITY, f32::NAN] {
        let v = [1.0, bad];
        let want = rt_inverse_shifts_diag(&v, &g, 0.1);
        let got = inverse::factored_damping_diag_a(&v, g.as_ref(), 0.1);
        let is_nf = matches!(
            got,
            Err(Error::NonFinite {
                what: "factor A",
                ..
            })
        );
        assert!(is_nf, "{got:?}");
        assert_eq!(got, want);
    }
    assert!(inverse::damped_inverse_diag(&mut [0.0f32], &[f32::INFINITY], 0.1).is_err());
    assert!(inverse::damped_inverse_diag(&mut [0.0f32], &[1.0], -0.1).is_err());
    assert!(inverse::damped_inverse_diag(&mut [0.0f32; 2], &[1.0], 0.1).is_err());
}

// ---------------------------------------------------------------------------
// Observation-side kernels
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Token counts are the runtime's loop bit for bit; an out-of-range id
    /// is an error (not a panic) with `d` untouched.
    #[test]
    fn token_counts_are_runtime_loop(seed in any::<u64>(), v in 1usize..50, nt in 0usize..200, first in any::<bool>(), beta in 1e-4f32..4.0, oob in any::<bool>()) {
        let mut rng = Rng(seed);
        let init: Vec<f32> = (0..v).map(|_| rng.val() as f32).collect();
        let mut tokens: Vec<usize> = (0..nt).map(|_| rng.below(v)).collect();
        let mut want = init.clone();
        rt_token_counts(&mut want, first, beta, &tokens);
        let mut d = init.clone();
        factor::diag_token_counts_update(&mut d, first, beta, &tokens).map_err(kerr)?;
        ensure(slice_bits32(&d) == slice_bits32(&want), || "counts differ".into())?;
        // Naive: counts times beta, exact for small counts of a power of two.
        let mut e = vec![0.0f64; v];
        for &t in &tokens { e[t] += 0.5; }
        let mut d2 = vec![9.0f64; v];
        factor::diag_token_counts_update(&mut d2, true, 0.5, &tokens).map_err(kerr)?;
        prop_assert_eq!(d2, e);
        if oob {
            let k = rng.below(nt + 1);
            tokens.insert(k, v + rng.below(3));
            let bad = tokens[k];
            let mut d = init.clone();
            prop_assert_eq!(
                factor::diag_token_counts_update(&mut d, first, beta, &tokens),
                Err(Error::IndexOutOfRange { what: "token id", index: bad, len: v })
            );
            ensure(slice_bits32(&d) == slice_bits32(&init), || "d modified".into())?;
        }
        let mut d = init.clone();
        prop_assert!(factor::diag_token_counts_update(&mut d, first, f32::NAN, &tokens).is_err());
        ensure(slice_bits32(&d) == slice_bits32(&init), || "d modified".into())?;
    }

    /// `accumulate_lower` is the runtime's Kronecker accumulation bit for
    /// bit; the strict upper triangle of `dst` is never written.
    #[test]
    fn accumulate_lower_is_runtime_loop(seed in any::<u64>(), n in 0usize..40, first in any::<bool>(), beta in -4.0f32..4.0, row_major in any::<bool>()) {
        let mut rng = Rng(seed);
        let src = mat32(&mut rng, n, n);
        let init = mat32(&mut rng, n, n);
        let mut want = init.clone();
        rt_accumulate(&mut want, src.as_ref(), beta, first);
        let mut dst = init.clone();
        if row_major {
            let mut t = init.transpose().to_owned();
            let st = src.transpose().to_owned();
            factor::accumulate_lower(t.as_mut().transpose_mut(), st.transpose(), beta, first).map_err(kerr)?;
            dst.copy_from(t.transpose());
        } else {
            factor::accumulate_lower(dst.as_mut(), src.as_ref(), beta, first).map_err(kerr)?;
        }
        ensure(bits32(dst.as_ref()) == bits32(want.as_ref()), || "differs from runtime".into())?;
        // Errors leave dst untouched.
        if n > 0 {
            let mut bad = src.clone();
            let (i, j) = { let a = rng.below(n); let b = rng.below(n); (a.max(b), a.min(b)) };
            bad[(i, j)] = f32::NAN;
            let mut d = init.clone();
            prop_assert_eq!(
                factor::accumulate_lower(d.as_mut(), bad.as_ref(), beta, first),
                Err(Error::NonFinite { what: "statistic", row: i, col: j })
            );
            prop_assert!(factor::accumulate_lower(d.as_mut(), src.as_ref(), f32::INFINITY, first).is_err());
            prop_assert!(factor::accumulate_lower(d.as_mut(), Mat::<f32>::zeros(n, n + 1).as_ref(), beta, first).is_err());
            ensure(bits32(d.as_ref()) == bits32(init.as_ref()), || "dst modified".into())?;
            // NaN in the (unread) strict upper triangle is fine.
            if n > 1 {
                let mut up = src.clone();
                up[(0, n - 1)] = f32::NAN;
                prop_assert!(factor::accumulate_lower(d.as_mut(), up.as_ref(), beta, first).is_ok());
            }
        }
    }

    /// `finite_matrix` / `finite_slice` report the first NaN/Inf (column by
    /// column for column-major views, row by row for row-major ones), as a
    /// naive scan does.
    #[test]
    fn finite_checks_locate_first_bad_entry(seed in any::<u64>(), r in 0usize..30, c in 0usize..30, nbad in 0usize..3, row_major in any::<bool>()) {
        let mut rng = Rng(seed);
        let mut m = mat64(&mut rng, r, c);
        if r * c > 0 {
            for _ in 0..nbad {
                let v = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][rng.below(3)];
                m[(rng.below(r), rng.below(c))] = v;
            }
        }
        let storage = m.transpose().to_owned();
        let view = if row_major { storage.transpose() } else { m.as_ref() };
        let mut first = None;
        if row_major {
            'o: for i in 0..r { for j in 0..c { if !m[(i, j)].is_finite() { first = Some((i, j)); break 'o; } } }
        } else {
            'o2: for j in 0..c { for i in 0..r { if !m[(i, j)].is_finite() { first = Some((i, j)); break 'o2; } } }
        }
        match (check::finite_matrix("m", view), first) {
            (Ok(p), None) => prop_assert_eq!(p.get().nrows(), r),
            (Err(e), Some((row, col))) => prop_assert_eq!(e, Error::NonFinite { what: "m", row, col }),
            (got, want) => return Err(TestCaseError::fail(format!("{:?} vs {want:?}", got.map(|_| ())))),
        }
        let flat: Vec<f64> = (0..c).flat_map(|j| (0..r).map(move |i| (i, j))).map(|(i, j)| m[(i, j)]).collect();
        let want = flat.iter().position(|v| !v.is_finite());
        match (check::finite_slice("s", &flat), want) {
            (Ok(()), None) => {}
            (Err(e), Some(i)) => prop_assert_eq!(e, Error::NonFinite { what: "s", row: i, col: 0 }),
            (got, want) => return Err(TestCaseError::fail(format!("{got:?} vs {want:?}"))),
        }
    }

    /// The `*_prechecked` updates give the same bits as the checking ones.
    #[test]
    fn prechecked_updates_equal_checked(seed in any::<u64>(), n in 1usize..20, d in 0usize..12, bias in any::<bool>(), alpha in prop::sample::select(vec![0.0f32, 1.0, 0.5])) {
        let mut rng = Rng(seed);
        let x = mat32(&mut rng, n, d);
        let dim = d + bias as usize;
        let init = mat32(&mut rng, dim, dim);
        let mut b = buf(factor::syrk_update_scratch::<f32>(n, d, bias, Par::Seq));
        let mut c1 = init.clone();
        factor::syrk_update(c1.as_mut(), alpha, 0.25, x.as_ref(), bias, Par::Seq, MemStack::new(&mut b)).map_err(kerr)?;
        let mut c2 = init.clone();
        let xc = check::finite_matrix("x", x.as_ref()).map_err(kerr)?;
        factor::syrk_update_prechecked(c2.as_mut(), alpha, 0.25, xc, bias, Par::Seq, MemStack::new(&mut b)).map_err(kerr)?;
        ensure(bits32(c1.as_ref()) == bits32(c2.as_ref()), || "syrk prechecked differs".into())?;
        // Argument errors of the prechecked variant still leave c untouched.
        let mut c3 = init.clone();
        prop_assert!(factor::syrk_update_prechecked(c3.as_mut(), f32::NAN, 0.25, xc, bias, Par::Seq, MemStack::new(&mut b)).is_err());
        ensure(bits32(c3.as_ref()) == bits32(init.as_ref()), || "c modified".into())?;

        // conv2d A and G, both layouts.
        let (ch, h, w, co) = (1 + rng.below(3), 3 + rng.below(3), 3 + rng.below(3), 1 + rng.below(3));
        let geom = Conv2dGeometry::new(n.min(3), ch, h, w, 2, 2).padding(rng.below(2), rng.below(2));
        let (oh, ow) = geom.output_size().map_err(kerr)?;
        let input: Vec<f32> = (0..geom.batch * ch * h * w).map(|_| rng.val() as f32).collect();
        let gout: Vec<f32> = (0..geom.batch * co * oh * ow).map(|_| rng.val() as f32).collect();
        let k = geom.patch_len().map_err(kerr)? + bias as usize;
        for layout in [ImageLayout::Nchw, ImageLayout::Nhwc] {
            let img = ImageRef::new(&input, layout, geom.batch, ch, h, w).map_err(kerr)?;
            let mut cb = buf(conv::conv2d_a_update_scratch::<f32>(&geom, bias).map_err(kerr)?);
            let mut a1 = Mat::<f32>::zeros(k, k);
            conv::conv2d_a_update(a1.as_mut(), 0.0, 1.0, img, &geom, bias, ConvNormalization::Kfc, Par::Seq, MemStack::new(&mut cb)).map_err(kerr)?;
            let mut a2 = Mat::<f32>::zeros(k, k);
            let imgc = check::finite_image(img).map_err(kerr)?;
            conv::conv2d_a_update_prechecked(a2.as_mut(), 0.0, 1.0, imgc, &geom, bias, ConvNormalization::Kfc, Par::Seq, MemStack::new(&mut cb)).map_err(kerr)?;
            ensure(bits32(a1.as_ref()) == bits32(a2.as_ref()), || "conv A prechecked differs".into())?;
            let go = ImageRef::new(&gout, layout, geom.batch, co, oh, ow).map_err(kerr)?;
            let mut g1 = Mat::<f32>::zeros(co, co);
            conv::conv2d_g_update(g1.as_mut(), 0.0, 2.0, go, ConvNormalization::KfacPytorch, Par::Seq).map_err(kerr)?;
            let mut g2 = Mat::<f32>::zeros(co, co);
            conv::conv2d_g_update_prechecked(g2.as_mut(), 0.0, 2.0, check::finite_image(go).map_err(kerr)?, ConvNormalization::KfacPytorch, Par::Seq).map_err(kerr)?;
            ensure(bits32(g1.as_ref()) == bits32(g2.as_ref()), || "conv G prechecked differs".into())?;
        }
        // A NaN input cannot get a proof.
        let mut bad = input.clone();
        let at = rng.below(bad.len());
        bad[at] = f32::NAN;
        let img = ImageRef::new(&bad, ImageLayout::Nchw, geom.batch, ch, h, w).map_err(kerr)?;
        prop_assert!(matches!(check::finite_image(img), Err(Error::NonFinite { .. })), "NaN image");
    }
}
