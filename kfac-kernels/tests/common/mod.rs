//! Shared helpers of the property tests: a tiny f64 dense matrix type with
//! naive reference algorithms (written here, independent of faer and of the
//! kernels), a deterministic generator of test matrices, and strided storage
//! for faer views of every layout the kernels accept.
//!
//! Reference conventions:
//! * every reference is computed in `f64` from the inputs *as rounded to the
//!   scalar type under test*, so the only differences left are the kernel's
//!   own rounding errors;
//! * `vec` stacks columns: `vec(X)[i + j * rows] = X[i, j]`, and
//!   `(A ⊗ B) vec(X) = vec(B X A^T)`.
//!
//! Tolerances are written as `c * k * eps * scale` where `eps` is the
//! machine epsilon of the scalar under test and `k` the length of the
//! longest accumulation (the classical bound
//! `|fl(Σ x_i y_i) - Σ x_i y_i| <= γ_k Σ |x_i y_i|`, `γ_k = k u / (1 - k u)`,
//! `u = eps / 2`; `c = 2` absorbs the `1 / (1 - k u)` factor, FMA and a
//! couple of extra scalings with a 2x margin over `γ_k <= k eps`).

#![allow(dead_code)]

use faer::{MatMut, MatRef, Par};
use kfac_kernels::Real;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// 256 cases per property (the CI minimum).
pub fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

/// The scalar types under test, with a bit view for "untouched" checks.
pub trait Flt: Real {
    /// The raw bits, widened to u64.
    fn bits(self) -> u64;
    /// Machine epsilon as f64.
    fn eps() -> f64 {
        Self::EPSILON.to_f64()
    }
    /// Round an f64 to this type and back.
    fn round(x: f64) -> f64 {
        Self::from_f64(x).to_f64()
    }
}
impl Flt for f32 {
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}
impl Flt for f64 {
    fn bits(self) -> u64 {
        self.to_bits()
    }
}

/// Machine epsilon of f64 (for the error of the f64 references).
pub const EPS64: f64 = f64::EPSILON;

// ---------------------------------------------------------------------------
// Dense f64 matrices and naive reference algorithms.
// ---------------------------------------------------------------------------

/// A column-major f64 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct M {
    pub r: usize,
    pub c: usize,
    pub d: Vec<f64>,
}

impl core::ops::Index<(usize, usize)> for M {
    type Output = f64;
    fn index(&self, (i, j): (usize, usize)) -> &f64 {
        assert!(i < self.r && j < self.c);
        &self.d[i + j * self.r]
    }
}
impl core::ops::IndexMut<(usize, usize)> for M {
    fn index_mut(&mut self, (i, j): (usize, usize)) -> &mut f64 {
        assert!(i < self.r && j < self.c);
        &mut self.d[i + j * self.r]
    }
}

impl M {
    pub fn zeros(r: usize, c: usize) -> M {
        M {
            r,
            c,
            d: vec![0.0; r * c],
        }
    }
    pub fn identity(n: usize) -> M {
        let mut m = M::zeros(n, n);
        for i in 0..n {
            m[(i, i)] = 1.0;
        }
        m
    }
    pub fn from_fn(r: usize, c: usize, f: impl Fn(usize, usize) -> f64) -> M {
        let mut m = M::zeros(r, c);
        for j in 0..c {
            for i in 0..r {
                m[(i, j)] = f(i, j);
            }
        }
        m
    }
    pub fn map(&self, f: impl Fn(f64) -> f64) -> M {
        M {
            r: self.r,
            c: self.c,
            d: self.d.iter().map(|&v| f(v)).collect(),
        }
    }
    pub fn abs(&self) -> M {
        self.map(f64::abs)
    }
    /// Every entry rounded to `T` (and widened back).
    pub fn round<T: Flt>(&self) -> M {
        self.map(T::round)
    }
    pub fn t(&self) -> M {
        M::from_fn(self.c, self.r, |i, j| self[(j, i)])
    }
    pub fn scale(&self, s: f64) -> M {
        self.map(|v| v * s)
    }
    pub fn add(&self, o: &M) -> M {
        assert_eq!((self.r, self.c), (o.r, o.c));
        M::from_fn(self.r, self.c, |i, j| self[(i, j)] + o[(i, j)])
    }
    pub fn sub(&self, o: &M) -> M {
        assert_eq!((self.r, self.c), (o.r, o.c));
        M::from_fn(self.r, self.c, |i, j| self[(i, j)] - o[(i, j)])
    }
    pub fn frob(&self) -> f64 {
        self.d.iter().map(|v| v * v).sum::<f64>().sqrt()
    }
    /// The symmetric matrix whose lower triangle is this one's.
    pub fn sym_from_lower(&self) -> M {
        M::from_fn(self.r, self.c, |i, j| {
            if i >= j {
                self[(i, j)]
            } else {
                self[(j, i)]
            }
        })
    }
    pub fn add_diag(&self, s: f64) -> M {
        let mut m = self.clone();
        for i in 0..m.r.min(m.c) {
            m[(i, i)] += s;
        }
        m
    }
    pub fn trace(&self) -> f64 {
        (0..self.r.min(self.c)).map(|i| self[(i, i)]).sum()
    }
}

/// `s + e = a + b` exactly (Knuth's TwoSum).
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    (s, (a - (s - bb)) + (b - bb))
}

/// Σ a_k b_k in twice the working precision (Ogita-Rump-Oishi Dot2: exact
/// products by FMA, error-free sums), rounded once: the result is within
/// `eps64 |Σ a_k b_k| + O(n^2 eps64^2) Σ |a_k b_k|` of the exact dot
/// product, so the f64 references below are accurate to about one f64
/// rounding and their own error can be neglected against the kernels'.
pub fn dot2(pairs: impl Iterator<Item = (f64, f64)>) -> f64 {
    let (mut s, mut c) = (0.0f64, 0.0f64);
    for (a, b) in pairs {
        let p = a * b;
        let ep = a.mul_add(b, -p);
        let (t, es) = two_sum(s, p);
        s = t;
        c += es + ep;
    }
    s + c
}

/// `a * b` (triple loop, accurate dot products).
pub fn matmul(a: &M, b: &M) -> M {
    assert_eq!(a.c, b.r);
    let mut out = M::zeros(a.r, b.c);
    for i in 0..a.r {
        for j in 0..b.c {
            out[(i, j)] = dot2((0..a.c).map(|k| (a[(i, k)], b[(k, j)])));
        }
    }
    out
}

/// `x^T x` (triple loop, accurate dot products).
pub fn gram(x: &M) -> M {
    let mut out = M::zeros(x.c, x.c);
    for i in 0..x.c {
        for j in 0..x.c {
            out[(i, j)] = dot2((0..x.r).map(|k| (x[(k, i)], x[(k, j)])));
        }
    }
    out
}

/// `[x 1]`: the homogeneous column of ones appended last.
pub fn with_bias(x: &M, bias: bool) -> M {
    if !bias {
        return x.clone();
    }
    M::from_fn(x.r, x.c + 1, |i, j| if j < x.c { x[(i, j)] } else { 1.0 })
}

/// Explicit Kronecker product `a ⊗ b` with
/// `out[i p + k, j q + l] = a[i, j] b[k, l]`, built with plain loops.
pub fn kron(a: &M, b: &M) -> M {
    let (p, q) = (b.r, b.c);
    let mut out = M::zeros(a.r * p, a.c * q);
    for i in 0..a.r {
        for j in 0..a.c {
            for k in 0..p {
                for l in 0..q {
                    out[(i * p + k, j * q + l)] = a[(i, j)] * b[(k, l)];
                }
            }
        }
    }
    out
}

/// `vec(x)` (columns stacked) as an `(r c) x 1` matrix.
pub fn vec_of(x: &M) -> M {
    let mut v = M::zeros(x.r * x.c, 1);
    for j in 0..x.c {
        for i in 0..x.r {
            v[(i + j * x.r, 0)] = x[(i, j)];
        }
    }
    v
}

/// Inverse of [`vec_of`].
pub fn unvec(v: &M, r: usize, c: usize) -> M {
    assert_eq!(v.r, r * c);
    M::from_fn(r, c, |i, j| v[(i + j * r, 0)])
}

/// Solves `a x = b` (several right-hand sides) by Gaussian elimination with
/// partial pivoting, in f64. Panics on an exactly singular pivot.
pub fn gauss_solve(a: &M, b: &M) -> M {
    let n = a.r;
    assert_eq!(a.c, n);
    assert_eq!(b.r, n);
    let mut a = a.clone();
    let mut b = b.clone();
    for k in 0..n {
        // pivot
        let mut p = k;
        for i in k + 1..n {
            if a[(i, k)].abs() > a[(p, k)].abs() {
                p = i;
            }
        }
        assert!(a[(p, k)] != 0.0, "reference solve: singular matrix");
        if p != k {
            for j in 0..n {
                let t = a[(k, j)];
                a[(k, j)] = a[(p, j)];
                a[(p, j)] = t;
            }
            for j in 0..b.c {
                let t = b[(k, j)];
                b[(k, j)] = b[(p, j)];
                b[(p, j)] = t;
            }
        }
        let piv = a[(k, k)];
        for i in k + 1..n {
            let f = a[(i, k)] / piv;
            if f == 0.0 {
                continue;
            }
            a[(i, k)] = 0.0;
            for j in k + 1..n {
                let v = a[(k, j)];
                a[(i, j)] -= f * v;
            }
            for j in 0..b.c {
                let v = b[(k, j)];
                b[(i, j)] -= f * v;
            }
        }
    }
    // back substitution
    for j in 0..b.c {
        for i in (0..n).rev() {
            let mut s = b[(i, j)];
            for k in i + 1..n {
                s -= a[(i, k)] * b[(k, j)];
            }
            b[(i, j)] = s / a[(i, i)];
        }
    }
    b
}

/// Eigenvalues (ascending) of the symmetric matrix whose lower triangle is
/// `a`, by the cyclic Jacobi method in f64 (absolute accuracy
/// `O(n eps64 ||a||_F)`).
pub fn jacobi_eigenvalues(a: &M) -> Vec<f64> {
    let n = a.r;
    let mut m = a.sym_from_lower();
    let total = m.frob();
    for _sweep in 0..100 {
        let mut off = 0.0;
        for j in 0..n {
            for i in 0..n {
                if i != j {
                    off += m[(i, j)] * m[(i, j)];
                }
            }
        }
        if off.sqrt() <= 1e-3 * EPS64 * total || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[(p, q)];
                if apq == 0.0 {
                    continue;
                }
                let theta = (m[(q, q)] - m[(p, p)]) / (2.0 * apq);
                let t = if theta.abs() > 1e150 {
                    0.5 / theta
                } else {
                    theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt())
                };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (m[(k, p)], m[(k, q)]);
                    m[(k, p)] = c * akp - s * akq;
                    m[(k, q)] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (m[(p, k)], m[(q, k)]);
                    m[(p, k)] = c * apk - s * aqk;
                    m[(q, k)] = s * apk + c * aqk;
                }
            }
        }
    }
    let mut l: Vec<f64> = (0..n).map(|i| m[(i, i)]).collect();
    l.sort_by(|x, y| x.partial_cmp(y).unwrap());
    l
}

/// Extreme absolute eigenvalues of `A ⊗ G + damping I` from the
/// eigenvalues of `A` and `G`: `(max |μ ν + damping|, min |μ ν + damping|)`.
pub fn kron_damped_extremes(la: &[f64], lg: &[f64], damping: f64) -> (f64, f64) {
    let mut hi = 0.0f64;
    let mut lo = f64::INFINITY;
    for &a in la {
        for &g in lg {
            let v = (a * g + damping).abs();
            hi = hi.max(v);
            lo = lo.min(v);
        }
    }
    (hi, lo)
}

/// Dense reference of the damped Kronecker solve:
/// `(A ⊗ G + damping I) vec(V) = vec(grad)`, with `A`, `G` given by their
/// lower triangles. Returns `(V, K)`.
pub fn dense_kron_solve(a: &M, g: &M, grad: &M, damping: f64) -> (M, M) {
    let k = kron(&a.sym_from_lower(), &g.sym_from_lower()).add_diag(damping);
    let v = gauss_solve(&k, &vec_of(grad));
    (unvec(&v, grad.r, grad.c), k)
}

// ---------------------------------------------------------------------------
// Comparisons.
// ---------------------------------------------------------------------------

/// `|got - want| <= tol` entrywise (over the entries where `mask` holds),
/// reporting the worst entry.
pub fn check_entrywise(
    what: &str,
    got: &M,
    want: &M,
    tol: &M,
    mask: impl Fn(usize, usize) -> bool,
) -> Result<(), TestCaseError> {
    assert_eq!((got.r, got.c), (want.r, want.c));
    let mut worst: Option<(usize, usize, f64)> = None;
    for j in 0..got.c {
        for i in 0..got.r {
            if !mask(i, j) {
                continue;
            }
            let err = (got[(i, j)] - want[(i, j)]).abs();
            let ok = err <= tol[(i, j)];
            if !ok {
                let ratio = if tol[(i, j)] > 0.0 {
                    err / tol[(i, j)]
                } else {
                    f64::INFINITY
                };
                if worst.is_none_or(|w| ratio > w.2 || ratio.is_nan()) {
                    worst = Some((i, j, ratio));
                }
            }
        }
    }
    if let Some((i, j, ratio)) = worst {
        return Err(TestCaseError::fail(format!(
            "{what}: entry ({i}, {j}) got {:e}, want {:e}, |err| = {:e} > tol {:e} (x{ratio:.3})",
            got[(i, j)],
            want[(i, j)],
            (got[(i, j)] - want[(i, j)]).abs(),
            tol[(i, j)]
        )));
    }
    Ok(())
}

/// Lower triangle (diagonal included).
pub fn lower(i: usize, j: usize) -> bool {
    i >= j
}

/// `err <= tol`, with a message.
pub fn check_le(what: &str, err: f64, tol: f64) -> Result<(), TestCaseError> {
    if err <= tol {
        Ok(())
    } else {
        Err(TestCaseError::fail(format!(
            "{what}: {err:e} > tol {tol:e} (x{:.3})",
            err / tol
        )))
    }
}

// ---------------------------------------------------------------------------
// Deterministic generation of test data from a proptest-chosen seed.
// ---------------------------------------------------------------------------

/// splitmix64.
#[derive(Clone, Debug)]
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    /// Uniform integer in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn matrix(&mut self, r: usize, c: usize) -> M {
        let mut m = M::zeros(r, c);
        for v in &mut m.d {
            *v = self.uniform(-1.0, 1.0);
        }
        m
    }
    /// A random orthogonal matrix (modified Gram-Schmidt, twice, in f64).
    pub fn orthogonal(&mut self, n: usize) -> M {
        loop {
            let mut q = self.matrix(n, n);
            let mut ok = true;
            for j in 0..n {
                for _ in 0..2 {
                    for k in 0..j {
                        let mut dot = 0.0;
                        for i in 0..n {
                            dot += q[(i, k)] * q[(i, j)];
                        }
                        for i in 0..n {
                            let v = q[(i, k)];
                            q[(i, j)] -= dot * v;
                        }
                    }
                }
                let nrm = (0..n).map(|i| q[(i, j)] * q[(i, j)]).sum::<f64>().sqrt();
                if nrm < 1e-3 {
                    ok = false;
                    break;
                }
                for i in 0..n {
                    q[(i, j)] /= nrm;
                }
            }
            if ok {
                return q;
            }
        }
    }
}

/// Shapes of generated activation matrices (one row per sample). Together
/// with batch sizes smaller than the dimension these give ill-conditioned
/// and rank-deficient factors.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// i.i.d. uniform in [-1, 1].
    Uniform,
    /// Column j scaled by 10^(-u_j), u_j uniform in [0, decades].
    ScaledCols(u8),
    /// One column is another plus a 1e-6 perturbation (or an exact copy).
    NearDuplicate { exact: bool },
    /// `U V^T` of the given rank (clamped to the shape).
    LowRank(usize),
    /// Large common offset (mean-dominated: ill-conditioned with a bias).
    Offset,
    /// All zeros.
    Zero,
}

pub fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::Uniform),
        2 => (1u8..=8).prop_map(Kind::ScaledCols),
        2 => any::<bool>().prop_map(|exact| Kind::NearDuplicate { exact }),
        2 => (0usize..4).prop_map(Kind::LowRank),
        1 => Just(Kind::Offset),
        1 => Just(Kind::Zero),
    ]
}

/// Activations of `n` samples, `d` columns.
pub fn activations(rg: &mut Gen, n: usize, d: usize, kind: Kind) -> M {
    let mut x = rg.matrix(n, d);
    match kind {
        Kind::Uniform => {}
        Kind::ScaledCols(dec) => {
            for j in 0..d {
                let s = 10f64.powf(-rg.uniform(0.0, dec as f64));
                for i in 0..n {
                    x[(i, j)] *= s;
                }
            }
        }
        Kind::NearDuplicate { exact } => {
            if d >= 2 {
                let a = rg.below(d);
                let b = (a + 1 + rg.below(d - 1)) % d;
                for i in 0..n {
                    let noise = if exact {
                        0.0
                    } else {
                        1e-6 * rg.uniform(-1.0, 1.0)
                    };
                    x[(i, b)] = x[(i, a)] + noise;
                }
            }
        }
        Kind::LowRank(r) => {
            let r = r.min(n).min(d);
            let u = rg.matrix(n, r);
            let v = rg.matrix(d, r);
            x = matmul(&u, &v.t());
        }
        Kind::Offset => {
            for v in &mut x.d {
                *v += 100.0;
            }
        }
        Kind::Zero => x = M::zeros(n, d),
    }
    x
}

/// A PSD factor `X^T X / n` (with `n` samples), computed exactly-ish in f64
/// and then rounded to `T`. Rank-deficient when `n < d` or for the
/// degenerate kinds.
pub fn psd_factor<T: Flt>(rg: &mut Gen, n: usize, d: usize, kind: Kind) -> M {
    let x = activations(rg, n, d, kind);
    gram(&x).scale(1.0 / n.max(1) as f64).round::<T>()
}

/// A symmetric matrix `Q diag(10^(-decades * t_i)) Q^T` (t_i uniform in
/// [0, 1]), eigenvalues spread over `decades` orders of magnitude, rounded
/// to `T` and symmetrized.
pub fn spread_spectrum<T: Flt>(rg: &mut Gen, d: usize, decades: f64) -> M {
    let q = rg.orthogonal(d);
    let l: Vec<f64> = (0..d).map(|_| 10f64.powf(-decades * rg.unit())).collect();
    let mut a = M::zeros(d, d);
    for i in 0..d {
        for j in 0..=i {
            a[(i, j)] = dot2((0..d).map(|k| (q[(i, k)] * l[k], q[(j, k)])));
        }
    }
    a.sym_from_lower().round::<T>()
}

// ---------------------------------------------------------------------------
// Strided storage for faer views.
// ---------------------------------------------------------------------------

/// How a matrix argument is laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    ColMajor,
    RowMajor,
    /// Column-major with `extra` unused elements after each column
    /// (a submatrix of a taller matrix).
    ColStrided(usize),
    /// Row-major with `extra` unused elements after each row.
    RowStrided(usize),
    /// Column-major storage viewed with both axes reversed (negative
    /// strides).
    Reversed,
}

pub fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        Just(Layout::ColMajor),
        Just(Layout::RowMajor),
        (1usize..4).prop_map(Layout::ColStrided),
        (1usize..4).prop_map(Layout::RowStrided),
        Just(Layout::Reversed),
    ]
}

/// Parallelism: sequential or two rayon threads.
pub fn par() -> impl Strategy<Value = bool> {
    prop_oneof![3 => Just(false), 1 => Just(true)]
}

pub fn par_of(rayon: bool) -> Par {
    if rayon {
        Par::rayon(2)
    } else {
        Par::Seq
    }
}

/// A matrix stored in a buffer of the given layout; unused elements hold
/// `pad`.
#[derive(Clone, Debug)]
pub struct Stored<T> {
    pub buf: Vec<T>,
    pub r: usize,
    pub c: usize,
    pub layout: Layout,
}

impl<T: Flt> Stored<T> {
    pub fn filled(r: usize, c: usize, layout: Layout, value: T) -> Self {
        let len = match layout {
            Layout::ColMajor | Layout::RowMajor | Layout::Reversed => r * c,
            Layout::ColStrided(e) => (r + e) * c,
            Layout::RowStrided(e) => (c + e) * r,
        };
        Stored {
            buf: vec![value; len],
            r,
            c,
            layout,
        }
    }

    /// `m` rounded to `T`; the unused elements hold `pad`.
    pub fn from_m(m: &M, layout: Layout, pad: T) -> Self {
        let mut s = Self::filled(m.r, m.c, layout, pad);
        {
            let mut v = s.view_mut();
            for j in 0..m.c {
                for i in 0..m.r {
                    v[(i, j)] = T::from_f64(m[(i, j)]);
                }
            }
        }
        s
    }

    pub fn view(&self) -> MatRef<'_, T> {
        let (r, c) = (self.r, self.c);
        match self.layout {
            Layout::ColMajor => MatRef::from_column_major_slice(&self.buf, r, c),
            Layout::RowMajor => MatRef::from_row_major_slice(&self.buf, r, c),
            Layout::ColStrided(e) => {
                MatRef::from_column_major_slice_with_stride(&self.buf, r, c, r + e)
            }
            Layout::RowStrided(e) => {
                MatRef::from_row_major_slice_with_stride(&self.buf, r, c, c + e)
            }
            Layout::Reversed => {
                MatRef::from_column_major_slice(&self.buf, r, c).reverse_rows_and_cols()
            }
        }
    }

    pub fn view_mut(&mut self) -> MatMut<'_, T> {
        let (r, c) = (self.r, self.c);
        match self.layout {
            Layout::ColMajor => MatMut::from_column_major_slice_mut(&mut self.buf, r, c),
            Layout::RowMajor => MatMut::from_row_major_slice_mut(&mut self.buf, r, c),
            Layout::ColStrided(e) => {
                MatMut::from_column_major_slice_with_stride_mut(&mut self.buf, r, c, r + e)
            }
            // Not `MatMut::from_row_major_slice_with_stride_mut`: in faer
            // 0.24.4 it builds a column-major view (row stride 1, column
            // stride `row_stride`), which reaches past the slice.
            Layout::RowStrided(e) => {
                MatMut::from_column_major_slice_with_stride_mut(&mut self.buf, c, r, c + e)
                    .transpose_mut()
            }
            Layout::Reversed => {
                MatMut::from_column_major_slice_mut(&mut self.buf, r, c).reverse_rows_and_cols_mut()
            }
        }
    }

    pub fn to_m(&self) -> M {
        let v = self.view();
        M::from_fn(self.r, self.c, |i, j| v[(i, j)].to_f64())
    }

    pub fn get(&self, i: usize, j: usize) -> T {
        self.view()[(i, j)]
    }

    pub fn set(&mut self, i: usize, j: usize, x: T) {
        self.view_mut()[(i, j)] = x;
    }

    /// Bits of the whole buffer (viewed entries and padding).
    pub fn bits(&self) -> Vec<u64> {
        self.buf.iter().map(|v| v.bits()).collect()
    }

    /// `true` for the buffer elements that are not part of the view.
    pub fn padding_mask(&self) -> Vec<bool> {
        let mut marker = Stored::<T>::filled(self.r, self.c, self.layout, T::ZERO);
        {
            let mut v = marker.view_mut();
            for j in 0..self.c {
                for i in 0..self.r {
                    v[(i, j)] = T::ONE;
                }
            }
        }
        marker.buf.iter().map(|&v| v == T::ZERO).collect()
    }
}

/// Checks that the padding of `after` and its view entries outside `keep`
/// (e.g. the strict upper triangle) are bitwise equal to `before`.
pub fn check_untouched<T: Flt>(
    what: &str,
    before: &Stored<T>,
    after: &Stored<T>,
    untouched: impl Fn(usize, usize) -> bool,
) -> Result<(), TestCaseError> {
    let mask = before.padding_mask();
    for (k, pad) in mask.iter().enumerate() {
        if *pad && before.buf[k].bits() != after.buf[k].bits() {
            return Err(TestCaseError::fail(format!(
                "{what}: padding element {k} changed from {:?} to {:?}",
                before.buf[k], after.buf[k]
            )));
        }
    }
    for j in 0..before.c {
        for i in 0..before.r {
            if untouched(i, j) && before.get(i, j).bits() != after.get(i, j).bits() {
                return Err(TestCaseError::fail(format!(
                    "{what}: entry ({i}, {j}) should be untouched but changed from {:?} to {:?}",
                    before.get(i, j),
                    after.get(i, j)
                )));
            }
        }
    }
    Ok(())
}

/// Strict upper triangle.
pub fn strict_upper(i: usize, j: usize) -> bool {
    i < j
}

/// A factor stored with its lower triangle from `m` and the strict upper
/// triangle (and the padding) filled with NaN, so that a kernel documented
/// to read only the lower triangle is checked to do so.
pub fn lower_only<T: Flt>(m: &M, layout: Layout) -> Stored<T> {
    let nan = T::from_f64(f64::NAN);
    let mut s = Stored::<T>::filled(m.r, m.c, layout, nan);
    for j in 0..m.c {
        for i in j..m.r {
            s.set(i, j, T::from_f64(m[(i, j)]));
        }
    }
    s
}

/// A scratch buffer for `req`.
pub fn buffer(req: faer::dyn_stack::StackReq) -> faer::dyn_stack::MemBuffer {
    faer::dyn_stack::MemBuffer::new(req)
}

/// Instantiates a property for `f32` and `f64`: a module `$name` with the
/// tests `in_f32` and `in_f64`, each running `$check::<T>(&case)` on
/// [`config`]`()` cases of `$strategy`.
macro_rules! both_types {
    ($name:ident, $strategy:expr, $check:ident) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            proptest::proptest! {
                #![proptest_config(common::config())]
                #[test]
                fn in_f32(case in $strategy) {
                    $check::<f32>(&case)?;
                }
                #[test]
                fn in_f64(case in $strategy) {
                    $check::<f64>(&case)?;
                }
            }
        }
    };
}

/// How much to damp relative to the factors' scale: `damping =
/// 10^(-u) * mean-eigenvalue(A) * mean-eigenvalue(G)` with `u` uniform in
/// `[0, max_decades(T)]`, `max_decades` about half the digits of `T` (3.5
/// for f32, 7.8 for f64) so that `kappa * eps` stays well below 1.
pub fn max_decades<T: Flt>() -> f64 {
    -T::eps().log10() / 2.0
}

/// Checks a computed `V` against `(A ⊗ G + damping I) vec(V) = vec(grad)`
/// (`A`, `G` by their lower triangles, as the kernel saw them in `T`):
///
/// * forward error against the dense solve (explicit Kronecker product,
///   Gaussian elimination with partial pivoting in f64):
///   `||V - V*||_F <= 8 kappa ((d_in + d_out + 4) eps + N eps64) ||V*||_F`,
///   where `kappa = (max |μ ν + damping|) / (min |μ ν + damping|)` over the
///   eigenvalues μ of `A` and ν of `G` (Jacobi, f64) is the condition number
///   of the `N x N` system, `N = d_in d_out`. The eigen path is backward
///   stable with a relative backward error of at most
///   `8 (d_in + 2) eps + 8 (d_out + 2) eps` (the two symmetric
///   eigendecompositions, bounded as in `prop_eigen`; the four matmuls with
///   orthogonal factors add `(d_in + d_out) eps`, absorbed in the 8); the
///   reference adds its own `N eps64 kappa` (GEPP on an SPD matrix has no
///   growth to speak of).
/// * residual (kappa-free, checks backward stability directly):
///   `||K vec(V) - vec(grad)||_2 <= 8 (d_in + d_out + 4) eps (||K||_2
///   ||V||_F + ||grad||_F)` with `K` built explicitly and applied with
///   accurate dot products.
pub fn check_kron_solution<T: Flt>(
    what: &str,
    v: &M,
    a: &M,
    g: &M,
    grad: &M,
    damping: f64,
) -> Result<(), TestCaseError> {
    let (d_out, d_in) = (grad.r, grad.c);
    let (want, k) = dense_kron_solve(a, g, grad, damping);
    let mu = jacobi_eigenvalues(a);
    let nu = jacobi_eigenvalues(g);
    let (hi, lo) = kron_damped_extremes(&mu, &nu, damping);
    let kappa = hi / lo;
    let dims = (d_in + d_out + 4) as f64;
    let n = (d_in * d_out) as f64;
    let fwd_tol = 8.0 * kappa * (dims * T::eps() + n * EPS64) * want.frob();
    check_le(
        &format!("{what}: forward error vs dense Kronecker solve (kappa = {kappa:.3e})"),
        v.sub(&want).frob(),
        fwd_tol,
    )?;
    let res = matmul(&k, &vec_of(v)).sub(&vec_of(grad)).frob();
    let res_tol = 8.0 * dims * T::eps() * (hi * v.frob() + grad.frob());
    check_le(
        &format!("{what}: residual ||K vec(V) - vec(grad)||"),
        res,
        res_tol,
    )
}

/// Where a test factor comes from.
#[derive(Clone, Copy, Debug)]
pub enum FactorSrc {
    /// `X^T X / n` from `n` samples of the given kind (rank-deficient when
    /// `n < d`).
    Gram { n: usize, kind: Kind },
    /// Eigenvalues spread over the given number of decades.
    Spread(f64),
}

pub fn factor_src() -> impl Strategy<Value = FactorSrc> {
    prop_oneof![
        3 => (1usize..=16, kind()).prop_map(|(n, kind)| FactorSrc::Gram { n, kind }),
        1 => (0.0..12.0f64).prop_map(FactorSrc::Spread),
    ]
}

/// A PSD test factor of dimension `d`, rounded to `T` (symmetric).
pub fn make_factor<T: Flt>(rg: &mut Gen, d: usize, src: FactorSrc) -> M {
    match src {
        FactorSrc::Gram { n, kind } => psd_factor::<T>(rg, n, d, kind),
        FactorSrc::Spread(decades) => spread_spectrum::<T>(rg, d, decades),
    }
}

/// `10^(-u_frac * max_decades(T))` times the product of the mean
/// eigenvalues (traces / dims) of `a` and `g`, or of 1 for a zero factor.
pub fn relative_damping<T: Flt>(a: &M, g: &M, u_frac: f64) -> f64 {
    let mean = |m: &M| {
        let t = m.trace() / m.r.max(1) as f64;
        if t > 0.0 {
            t
        } else {
            1.0
        }
    };
    T::round(10f64.powf(-u_frac * max_decades::<T>()) * mean(a) * mean(g))
}

/// Spectral norm `||m||_2 = sqrt(λ_max(m^T m))` (Jacobi, f64).
pub fn spectral_norm(m: &M) -> f64 {
    if m.r == 0 || m.c == 0 {
        return 0.0;
    }
    let l = jacobi_eigenvalues(&matmul(&m.t(), m));
    l.last().copied().unwrap_or(0.0).max(0.0).sqrt()
}
