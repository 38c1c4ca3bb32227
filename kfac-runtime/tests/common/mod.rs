//! Independent references for the runtime tests: naive f64 loops and a
//! hand-written Gaussian elimination; nothing here calls kfac code.
#![allow(dead_code)]

pub mod dist;

/// Row-major dense f64 matrix.
#[derive(Clone, Debug)]
pub struct M {
    pub r: usize,
    pub c: usize,
    pub v: Vec<f64>,
}

impl M {
    pub fn zeros(r: usize, c: usize) -> Self {
        Self {
            r,
            c,
            v: vec![0.0; r * c],
        }
    }
    pub fn from_fn(r: usize, c: usize, f: impl Fn(usize, usize) -> f64) -> Self {
        let mut m = Self::zeros(r, c);
        for i in 0..r {
            for j in 0..c {
                m.v[i * c + j] = f(i, j);
            }
        }
        m
    }
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.v[i * self.c + j]
    }
    pub fn set(&mut self, i: usize, j: usize, x: f64) {
        self.v[i * self.c + j] = x;
    }
    pub fn t(&self) -> M {
        M::from_fn(self.c, self.r, |i, j| self.at(j, i))
    }
    pub fn mul(&self, o: &M) -> M {
        assert_eq!(self.c, o.r);
        let mut out = M::zeros(self.r, o.c);
        for i in 0..self.r {
            for k in 0..self.c {
                let a = self.at(i, k);
                for j in 0..o.c {
                    out.v[i * o.c + j] += a * o.at(k, j);
                }
            }
        }
        out
    }
    pub fn scale(&self, s: f64) -> M {
        M {
            r: self.r,
            c: self.c,
            v: self.v.iter().map(|x| x * s).collect(),
        }
    }
    pub fn add(&self, o: &M) -> M {
        M {
            r: self.r,
            c: self.c,
            v: self.v.iter().zip(&o.v).map(|(a, b)| a + b).collect(),
        }
    }
    pub fn add_diag(&self, s: f64) -> M {
        let mut m = self.clone();
        for i in 0..m.r.min(m.c) {
            m.v[i * m.c + i] += s;
        }
        m
    }
    pub fn trace(&self) -> f64 {
        (0..self.r).map(|i| self.at(i, i)).sum()
    }
    pub fn fro(&self) -> f64 {
        self.v.iter().map(|x| x * x).sum::<f64>().sqrt()
    }
}

/// `[x 1]` when `bias`.
pub fn with_ones(x: &M, bias: bool) -> M {
    if !bias {
        return x.clone();
    }
    M::from_fn(x.r, x.c + 1, |i, j| if j < x.c { x.at(i, j) } else { 1.0 })
}

/// `x^T x / n`.
pub fn second_moment(x: &M) -> M {
    x.t().mul(x).scale(1.0 / x.r as f64)
}

/// Explicit Kronecker product `a ⊗ b`.
pub fn kron(a: &M, b: &M) -> M {
    M::from_fn(a.r * b.r, a.c * b.c, |r, c| {
        a.at(r / b.r, c / b.c) * b.at(r % b.r, c % b.c)
    })
}

/// Column-stacking vec.
pub fn vec_cols(x: &M) -> Vec<f64> {
    let mut v = Vec::with_capacity(x.r * x.c);
    for j in 0..x.c {
        for i in 0..x.r {
            v.push(x.at(i, j));
        }
    }
    v
}

pub fn unvec_cols(v: &[f64], r: usize, c: usize) -> M {
    M::from_fn(r, c, |i, j| v[i + j * r])
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting.
pub fn solve(a: &M, b: &[f64]) -> Vec<f64> {
    let n = a.r;
    let mut m = a.v.clone();
    let mut x = b.to_vec();
    for k in 0..n {
        let p = (k..n)
            .max_by(|&i, &j| m[i * n + k].abs().total_cmp(&m[j * n + k].abs()))
            .unwrap();
        if p != k {
            for j in 0..n {
                m.swap(k * n + j, p * n + j);
            }
            x.swap(k, p);
        }
        let piv = m[k * n + k];
        for i in k + 1..n {
            let f = m[i * n + k] / piv;
            if f != 0.0 {
                for j in k..n {
                    m[i * n + j] -= f * m[k * n + j];
                }
                x[i] -= f * x[k];
            }
        }
    }
    for k in (0..n).rev() {
        let mut s = x[k];
        for j in k + 1..n {
            s -= m[k * n + j] * x[j];
        }
        x[k] = s / m[k * n + k];
    }
    x
}

/// `(A ⊗ G + damping I)^{-1} vec(grad)` by the dense solve.
pub fn dense_kron_solve(a: &M, g: &M, damping: f64, grad: &M) -> M {
    let k = kron(a, g).add_diag(damping);
    unvec_cols(&solve(&k, &vec_cols(grad)), grad.r, grad.c)
}

/// `M^{-1}` by solving against the identity.
pub fn inverse(m: &M) -> M {
    let n = m.r;
    let mut out = M::zeros(n, n);
    for j in 0..n {
        let e: Vec<f64> = (0..n).map(|i| (i == j) as u8 as f64).collect();
        for (i, v) in solve(m, &e).into_iter().enumerate() {
            out.set(i, j, v);
        }
    }
    out
}

/// Largest eigenvalue of a symmetric PSD matrix, bounded above by its
/// largest absolute row sum (Gershgorin) — used only for tolerances.
pub fn spectral_bound(m: &M) -> f64 {
    (0..m.r)
        .map(|i| (0..m.c).map(|j| m.at(i, j).abs()).sum::<f64>())
        .fold(0.0, f64::max)
}

/// Relative Frobenius error of `got` (f32) against `want`.
pub fn rel_err(got: &[f32], want: &M) -> f64 {
    let num: f64 = got
        .iter()
        .zip(&want.v)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum::<f64>()
        .sqrt();
    num / want.fro().max(1e-300)
}

/// Deterministic pseudo-random numbers in [-1, 1) (SplitMix64).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    pub fn mat(&mut self, r: usize, c: usize, scale: f64) -> M {
        let mut m = M::zeros(r, c);
        for v in &mut m.v {
            // round to f32 so the reference sees exactly what the engine sees
            *v = (self.next() * scale) as f32 as f64;
        }
        m
    }
}

pub fn to_f32(m: &M) -> Vec<f32> {
    m.v.iter().map(|&x| x as f32).collect()
}
