//! # kfac-runtime
//!
//! The K-FAC preconditioner a training loop uses: layers (linear, conv2d,
//! embedding, generic Kronecker blocks), validated configuration with
//! schedules, the `observe` / `step` API, KL clipping, checkpoints, stage
//! timings, and parallelism across independent layers on a rayon pool.
//! The math is that of [`kfac_kernels`] (see its crate docs).
//!
//! ```
//! use faer::{Mat, MatRef};
//! use kfac_runtime::{Config, LayerGrad, LayerKind, Observation, Preconditioner};
//!
//! let mut p = Preconditioner::new(Config { threads: 1, ..Config::default() })?;
//! let fc = p.register("fc", LayerKind::Linear { in_features: 3, out_features: 2, bias: true })?;
//! // One batch of 4 samples: activations 4x3, output gradients 4x2.
//! let a = Mat::<f32>::from_fn(4, 3, |i, j| (i + j) as f32 * 0.1);
//! let g = Mat::<f32>::from_fn(4, 2, |i, j| (i as f32 - j as f32) * 0.01);
//! p.observe(fc, Observation::Linear { activations: a.as_ref(), output_grads: g.as_ref() })?;
//! let mut w = vec![0.1f32; 6];
//! let mut b = vec![0.05f32; 2];
//! let stats = p.step(&mut [LayerGrad::from_row_major(fc, &mut w, 2, 3, Some(&mut b))?])?;
//! assert!(stats.inverses_updated && w.iter().all(|v| v.is_finite()));
//! # Ok::<(), kfac_runtime::Error>(())
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
mod codec;
pub mod comm;
mod config;
mod distributed;
mod error;
mod exchange;
mod inspect;
mod layer;
mod mem;
mod observe;
mod preconditioner;
mod state;
mod stats;
mod step;

pub use config::{Compat, Config, Method, Precision, Schedule, WirePrecision};
pub use error::{Error, ErrorKind, Result};
pub use inspect::Decomposition;
pub use layer::{Conv2dSpec, LayerGrad, LayerId, LayerKind, Observation};
pub use preconditioner::Preconditioner;
pub use stats::{StageTimes, StepStats};

pub use kfac_kernels;
pub use kfac_kernels::conv::ImageLayout;
