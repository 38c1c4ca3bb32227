//! A small fully connected network with hand-written forward and backward
//! passes (faer matmuls, f32), and the two losses of the demo.
//!
//! Conventions, chosen to match what [`kfac_runtime`] expects:
//!
//! * a batch is `n x features`, one sample per row;
//! * a layer computes `z = x W^T + b` with `W` stored `out x in` row-major
//!   (PyTorch's layout, what [`LayerGrad::from_row_major`] takes) and the
//!   bias separate;
//! * [`Mlp::backward`] returns, for every layer, the **per-sample** output
//!   gradients `d l_i / d z_i` (`n x out`), i.e. the gradients of the *sum*
//!   of the per-sample losses. The training loss is the batch *mean*, so its
//!   output gradients are these divided by `n`; [`Mlp::gradients`] applies
//!   that `1/n` when it forms the weight gradients. The per-sample values are
//!   exactly what K-FAC's `G = g^T g / n` needs to be the Fisher's factor.
//!
//! [`LayerGrad::from_row_major`]: kfac_runtime::LayerGrad::from_row_major

use faer::linalg::matmul::matmul;
use faer::prelude::ReborrowMut;
use faer::{Accum, Mat, MatMut, MatRef, Par};

use super::rng::SplitMix64;

/// Element-wise nonlinearity of the hidden layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `tanh(z)`.
    Tanh,
    /// `max(z, 0)`.
    Relu,
    /// `1 / (1 + exp(-z))`.
    Sigmoid,
}

impl Activation {
    fn apply(self, mut z: MatMut<'_, f32>) {
        for j in 0..z.ncols() {
            for v in z.rb_mut().col_mut(j).iter_mut() {
                *v = match self {
                    Activation::Tanh => v.tanh(),
                    Activation::Relu => v.max(0.0),
                    Activation::Sigmoid => sigmoid(*v),
                };
            }
        }
    }

    /// `d *= f'(z)`, with `f'` written in terms of the output `h = f(z)`.
    fn mul_derivative(self, mut d: MatMut<'_, f32>, h: MatRef<'_, f32>) {
        for j in 0..d.ncols() {
            for (dv, &hv) in d.rb_mut().col_mut(j).iter_mut().zip(h.col(j).iter()) {
                *dv *= match self {
                    Activation::Tanh => 1.0 - hv * hv,
                    Activation::Relu => {
                        if hv > 0.0 {
                            1.0
                        } else {
                            0.0
                        }
                    }
                    Activation::Sigmoid => hv * (1.0 - hv),
                };
            }
        }
    }
}

/// The logistic function.
pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// One fully connected layer `z = x W^T + b`.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Weight, `out_features x in_features`, row-major.
    pub weight: Vec<f32>,
    /// Bias, `out_features` values.
    pub bias: Vec<f32>,
}

impl Linear {
    /// The weight as a faer view (`out x in`).
    pub fn weight_ref(&self) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&self.weight, self.out_features, self.in_features)
    }
}

/// Gradient of one layer's parameters, in the layout of [`Linear`].
#[derive(Clone, Debug, PartialEq)]
pub struct LinearGrad {
    /// Weight gradient, `out x in` row-major.
    pub weight: Vec<f32>,
    /// Bias gradient.
    pub bias: Vec<f32>,
}

/// What the forward pass keeps for the backward pass.
#[derive(Clone, Debug)]
pub struct ForwardCache {
    /// The input of every layer (`n x in_l`): the batch itself, then the
    /// hidden activations. These are K-FAC's `a` statistics.
    pub inputs: Vec<Mat<f32>>,
    /// The last layer's output (pre-activation: logits), `n x out`.
    pub output: Mat<f32>,
}

/// A multi-layer perceptron: hidden layers use one [`Activation`], the last
/// layer is linear (the loss applies softmax or sigmoid).
#[derive(Clone, Debug, PartialEq)]
pub struct Mlp {
    /// The layers, input first.
    pub layers: Vec<Linear>,
    /// Nonlinearity after every layer but the last.
    pub activation: Activation,
}

impl Mlp {
    /// A network with layer widths `sizes` (input first, at least two
    /// entries), weights drawn from `N(0, gain^2 / fan_in)` (`gain` 1 for
    /// tanh/sigmoid, `sqrt 2` for ReLU) and zero biases.
    ///
    /// # Panics
    /// If `sizes` has fewer than two entries or a zero width.
    pub fn new(sizes: &[usize], activation: Activation, rng: &mut SplitMix64) -> Self {
        assert!(
            sizes.len() >= 2 && sizes.iter().all(|&s| s > 0),
            "an MLP needs at least two non-zero layer widths"
        );
        let gain: f64 = match activation {
            Activation::Relu => 2f64.sqrt(),
            Activation::Tanh | Activation::Sigmoid => 1.0,
        };
        let layers = sizes
            .windows(2)
            .map(|w| {
                let (i, o) = (w[0], w[1]);
                let std = gain / (i as f64).sqrt();
                Linear {
                    in_features: i,
                    out_features: o,
                    weight: (0..i * o).map(|_| (rng.normal() * std) as f32).collect(),
                    bias: vec![0.0; o],
                }
            })
            .collect();
        Self { layers, activation }
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.weight.len() + l.bias.len())
            .sum()
    }

    /// Forward pass of a batch `x` (`n x in`).
    pub fn forward(&self, x: MatRef<'_, f32>) -> ForwardCache {
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut cur = x.to_owned();
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let mut z = Mat::<f32>::zeros(cur.nrows(), layer.out_features);
            matmul(
                z.as_mut(),
                Accum::Replace,
                cur.as_ref(),
                layer.weight_ref().transpose(),
                1.0,
                Par::Seq,
            );
            for (j, &b) in layer.bias.iter().enumerate() {
                for v in z.col_mut(j).iter_mut() {
                    *v += b;
                }
            }
            if l < last {
                self.activation.apply(z.as_mut());
            }
            inputs.push(cur);
            cur = z;
        }
        ForwardCache {
            inputs,
            output: cur,
        }
    }

    /// Back-propagates per-sample output gradients `top` (`n x out`, the
    /// gradient of the *sum* of the per-sample losses w.r.t. the logits):
    /// returns the per-sample gradients w.r.t. every layer's output
    /// (pre-activation), input layer first.
    pub fn backward(&self, cache: &ForwardCache, top: Mat<f32>) -> Vec<Mat<f32>> {
        let nl = self.layers.len();
        let mut rev = Vec::with_capacity(nl);
        rev.push(top);
        for l in (1..nl).rev() {
            let layer = &self.layers[l];
            let g = rev.last().expect("non-empty");
            let mut d = Mat::<f32>::zeros(g.nrows(), layer.in_features);
            matmul(
                d.as_mut(),
                Accum::Replace,
                g.as_ref(),
                layer.weight_ref(),
                1.0,
                Par::Seq,
            );
            self.activation
                .mul_derivative(d.as_mut(), cache.inputs[l].as_ref());
            rev.push(d);
        }
        rev.reverse();
        rev
    }

    /// Gradients of the batch-*mean* loss from the per-sample output
    /// gradients of [`backward`](Self::backward): `dW = g^T a / n`,
    /// `db = colsum(g) / n`.
    pub fn gradients(&self, cache: &ForwardCache, out_grads: &[Mat<f32>]) -> Vec<LinearGrad> {
        self.layers
            .iter()
            .zip(&cache.inputs)
            .zip(out_grads)
            .map(|((layer, a), g)| {
                let s = 1.0 / g.nrows() as f32;
                let mut weight = vec![0.0f32; layer.weight.len()];
                matmul(
                    MatMut::from_row_major_slice_mut(
                        &mut weight,
                        layer.out_features,
                        layer.in_features,
                    ),
                    Accum::Replace,
                    g.transpose(),
                    a.as_ref(),
                    s,
                    Par::Seq,
                );
                let bias = (0..layer.out_features)
                    .map(|j| g.col(j).iter().sum::<f32>() * s)
                    .collect();
                LinearGrad { weight, bias }
            })
            .collect()
    }
}

/// The training objective on the network's last-layer output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Softmax cross-entropy against class labels (classification).
    SoftmaxCrossEntropy,
    /// Sigmoid (Bernoulli) cross-entropy against targets in `[0, 1]`,
    /// summed over outputs (the autoencoder, as in Hinton & Salakhutdinov
    /// 2006 and Martens & Grosse 2015).
    SigmoidCrossEntropy,
}

/// Targets of a batch.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// Class labels, one per sample.
    Labels(&'a [usize]),
    /// Target values, `n x out` (the autoencoder's input).
    Values(MatRef<'a, f32>),
}

impl Loss {
    /// Mean loss over the batch and the per-sample output gradients
    /// `d l_i / d z_i` (`n x out`; divide by `n` for the mean's gradient).
    ///
    /// # Panics
    /// If the targets do not fit the loss or the output's shape.
    pub fn loss_and_grad(self, z: MatRef<'_, f32>, targets: Targets<'_>) -> (f64, Mat<f32>) {
        let (n, k) = (z.nrows(), z.ncols());
        let mut g = Mat::<f32>::zeros(n, k);
        let mut total = 0f64;
        match (self, targets) {
            (Loss::SoftmaxCrossEntropy, Targets::Labels(y)) => {
                assert_eq!(y.len(), n, "one label per sample");
                let mut p = vec![0f32; k];
                for (i, &yi) in y.iter().enumerate() {
                    let lse = softmax_row(z, i, &mut p);
                    total += (lse - z[(i, yi)]) as f64;
                    for j in 0..k {
                        g[(i, j)] = p[j] - if j == yi { 1.0 } else { 0.0 };
                    }
                }
            }
            (Loss::SigmoidCrossEntropy, Targets::Values(t)) => {
                assert_eq!((t.nrows(), t.ncols()), (n, k), "targets must match outputs");
                for j in 0..k {
                    for i in 0..n {
                        let (zv, tv) = (z[(i, j)], t[(i, j)]);
                        // softplus(z) - t z, computed stably.
                        total += (zv.max(0.0) - tv * zv + (-zv.abs()).exp().ln_1p()) as f64;
                        g[(i, j)] = sigmoid(zv) - tv;
                    }
                }
            }
            _ => panic!("targets do not match the loss"),
        }
        (total / n as f64, g)
    }

    /// Per-sample output gradients with targets *sampled from the model's
    /// predictive distribution* (a class from the softmax, or Bernoulli
    /// pixels from the sigmoid): their second moment is the true Fisher's
    /// (Martens & Grosse 2015, section 5), not the empirical Fisher's.
    pub fn sampled_grad(self, z: MatRef<'_, f32>, rng: &mut SplitMix64) -> Mat<f32> {
        let (n, k) = (z.nrows(), z.ncols());
        let mut g = Mat::<f32>::zeros(n, k);
        match self {
            Loss::SoftmaxCrossEntropy => {
                let mut p = vec![0f32; k];
                for i in 0..n {
                    softmax_row(z, i, &mut p);
                    let u = rng.next_f64() as f32;
                    let mut acc = 0f32;
                    let mut y = k - 1;
                    for (j, &pj) in p.iter().enumerate() {
                        acc += pj;
                        if u < acc {
                            y = j;
                            break;
                        }
                    }
                    for j in 0..k {
                        g[(i, j)] = p[j] - if j == y { 1.0 } else { 0.0 };
                    }
                }
            }
            Loss::SigmoidCrossEntropy => {
                for j in 0..k {
                    for i in 0..n {
                        let s = sigmoid(z[(i, j)]);
                        let y = if (rng.next_f64() as f32) < s {
                            1.0
                        } else {
                            0.0
                        };
                        g[(i, j)] = s - y;
                    }
                }
            }
        }
        g
    }
}

/// Softmax of row `i` of `z` into `p`; returns the log-sum-exp.
fn softmax_row(z: MatRef<'_, f32>, i: usize, p: &mut [f32]) -> f32 {
    let k = z.ncols();
    let m = (0..k).map(|j| z[(i, j)]).fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0f32;
    for (j, pj) in p.iter_mut().enumerate() {
        *pj = (z[(i, j)] - m).exp();
        s += *pj;
    }
    for pj in p.iter_mut() {
        *pj /= s;
    }
    m + s.ln()
}

/// Fraction of rows of `z` whose largest entry is at the label.
pub fn accuracy(z: MatRef<'_, f32>, labels: &[usize]) -> f64 {
    let correct = labels
        .iter()
        .enumerate()
        .filter(|&(i, &y)| {
            let mut best = 0;
            for j in 1..z.ncols() {
                if z[(i, j)] > z[(i, best)] {
                    best = j;
                }
            }
            best == y
        })
        .count();
    correct as f64 / labels.len().max(1) as f64
}

/// Mean over rows of the summed squared error `Σ_j (sigmoid(z_ij) - t_ij)^2`
/// (the autoencoder's reconstruction error).
pub fn reconstruction_error(z: MatRef<'_, f32>, t: MatRef<'_, f32>) -> f64 {
    let mut total = 0f64;
    for j in 0..z.ncols() {
        for i in 0..z.nrows() {
            let d = (sigmoid(z[(i, j)]) - t[(i, j)]) as f64;
            total += d * d;
        }
    }
    total / z.nrows().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finite-difference check of forward/backward/gradients.
    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = SplitMix64::new(3);
        for (loss, act) in [
            (Loss::SoftmaxCrossEntropy, Activation::Tanh),
            (Loss::SigmoidCrossEntropy, Activation::Sigmoid),
        ] {
            let mlp = Mlp::new(&[5, 4, 3], act, &mut rng);
            let x = Mat::<f32>::from_fn(6, 5, |i, j| ((i * 5 + j) as f32 * 0.37).sin());
            let labels = [0usize, 1, 2, 1, 0, 2];
            let tv = Mat::<f32>::from_fn(6, 3, |i, j| ((i + j) % 3) as f32 / 2.0);
            let targets = |_: ()| match loss {
                Loss::SoftmaxCrossEntropy => Targets::Labels(&labels),
                Loss::SigmoidCrossEntropy => Targets::Values(tv.as_ref()),
            };
            let f = |m: &Mlp| {
                loss.loss_and_grad(m.forward(x.as_ref()).output.as_ref(), targets(()))
                    .0
            };
            let cache = mlp.forward(x.as_ref());
            let (_, top) = loss.loss_and_grad(cache.output.as_ref(), targets(()));
            let g = mlp.gradients(&cache, &mlp.backward(&cache, top));
            let h = 1e-2f32;
            let shifted = |l: usize, bias: bool, p: usize, d: f32| {
                let mut m = mlp.clone();
                let v = if bias {
                    &mut m.layers[l].bias
                } else {
                    &mut m.layers[l].weight
                };
                v[p] += d;
                m
            };
            for (l, gl) in g.iter().enumerate() {
                for (bias, grad) in [(false, &gl.weight), (true, &gl.bias)] {
                    for (p, &gp) in grad.iter().enumerate() {
                        let fd = (f(&shifted(l, bias, p, h)) - f(&shifted(l, bias, p, -h)))
                            / (2.0 * h as f64);
                        assert!(
                            (fd - gp as f64).abs() < 2e-3,
                            "layer {l} bias {bias} #{p}: {fd} vs {gp}"
                        );
                    }
                }
            }
        }
    }
}
