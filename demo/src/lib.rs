//! A self-contained training demo: small networks on the UCI digits data
//! (embedded in the crate), trained with SGD + momentum, Adam, and K-FAC
//! (this workspace's [`Preconditioner`](kfac_runtime::Preconditioner)
//! followed by SGD + momentum), so that the three can be compared on equal
//! terms: same architecture, same initial weights, same minibatches.
//!
//! Everything is hand-written on faer matrices in f32: [`data`] (gzip CSV
//! loading, normalization, the fixed train/test split), [`rng`] (SplitMix64),
//! [`mlp`] (forward/backward passes and losses), [`optim`] (the optimizers)
//! and the training loop [`train`] / [`train_with`]. Two tasks: digit
//! classification (`64-128-64-10`, tanh) and a deep autoencoder
//! (`64-48-32-16-32-48-64`, tanh, sigmoid cross-entropy) — Martens & Grosse's
//! autoencoder benchmark in miniature.
//!
//! What K-FAC is given, per linear layer and step: the layer's inputs
//! (`n x in`) and the **per-sample** gradients of the loss w.r.t. the
//! layer's outputs (`n x out`). The training loss is the batch mean, whose
//! output gradients are `1/n` of these; passing the per-sample values makes
//! the runtime's `G = g^T g / n` the Fisher's G factor. By default the
//! output gradients are those of targets sampled from the model's own
//! predictive distribution (the true Fisher, [`FisherKind::Sampled`]).
//!
//! `cargo run --release -p kfac-demo` (the `train` binary) runs the
//! comparison and plots it.
//!
//! ```
//! use kfac_demo::{train, KfacSettings, Optimizer, Target, Task, TrainConfig};
//! let mut cfg = TrainConfig::new(Task::Classify, Optimizer::Kfac(KfacSettings::default()));
//! cfg.layer_sizes = vec![64, 32, 10];
//! cfg.epochs = 2;
//! cfg.train_limit = Some(256);
//! let run = train(&cfg).unwrap();
//! assert!(run.last().test_accuracy.unwrap() > 0.5);
//! assert!(run.last().kfac_times.unwrap().steps > 0);
//! # let _ = run.first_reaching(Target::Accuracy(0.9));
//! ```

pub mod data;
pub mod mlp;
pub mod optim;
pub mod rng;
mod train;

pub use optim::{FisherKind, KfacSettings, KfacTimes, Optimizer};
pub use train::{
    train, train_distributed, train_with, DemoError, EpochRecord, RunResult, Target, Task,
    TrainConfig,
};
