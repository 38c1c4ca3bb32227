//! Checkpoints: a restored preconditioner continues bitwise identically;
//! truncated, corrupted and incompatible checkpoints are refused with an
//! error that names the problem.

mod common;

use common::{second_moment, to_f32, Rng};
use faer::MatRef;
use kfac_runtime::{
    checkpoint, Compat, Config, Conv2dSpec, Error, ImageLayout, LayerGrad, LayerId, LayerKind,
    Method, Observation, Precision, Preconditioner, Schedule,
};
use proptest::prelude::{any, prop_assert_eq, proptest, ProptestConfig};

/// Drives a small model: a linear layer with bias, a conv layer, an
/// embedding and a generic Kronecker block, with data from `rng`.
struct Driver {
    ids: Vec<LayerId>,
}

impl Driver {
    fn new(p: &mut Preconditioner) -> Self {
        let ids = vec![
            p.register(
                "fc",
                LayerKind::Linear {
                    in_features: 4,
                    out_features: 3,
                    bias: true,
                },
            )
            .unwrap(),
            p.register(
                "conv",
                LayerKind::Conv2d(Conv2dSpec {
                    in_channels: 2,
                    out_channels: 2,
                    kernel: (2, 2),
                    stride: (1, 1),
                    padding: (0, 0),
                    dilation: (1, 1),
                    bias: false,
                    layout: ImageLayout::Nhwc,
                }),
            )
            .unwrap(),
            p.register(
                "emb",
                LayerKind::Embedding {
                    num_embeddings: 5,
                    dim: 2,
                },
            )
            .unwrap(),
            p.register("kron", LayerKind::Kronecker { a_dim: 3, g_dim: 2 })
                .unwrap(),
        ];
        Self { ids }
    }

    fn observe(&self, p: &mut Preconditioner, rng: &mut Rng) {
        let a = to_f32(&rng.mat(6, 4, 1.0));
        let g = to_f32(&rng.mat(6, 3, 1.0));
        p.observe(
            self.ids[0],
            Observation::Linear {
                activations: MatRef::from_row_major_slice(&a, 6, 4),
                output_grads: MatRef::from_row_major_slice(&g, 6, 3),
            },
        )
        .unwrap();
        let x = to_f32(&rng.mat(1, 2 * 3 * 3 * 2, 1.0));
        let go = to_f32(&rng.mat(1, 2 * 2 * 2 * 2, 1.0));
        p.observe(
            self.ids[1],
            Observation::Conv2d {
                input: &x,
                output_grads: &go,
                batch: 2,
                height: 3,
                width: 3,
            },
        )
        .unwrap();
        let tokens: Vec<usize> = (0..4)
            .map(|_| ((rng.next() + 1.0) * 2.49) as usize)
            .collect();
        let ge = to_f32(&rng.mat(4, 2, 1.0));
        p.observe(
            self.ids[2],
            Observation::Embedding {
                tokens: &tokens,
                output_grads: MatRef::from_row_major_slice(&ge, 4, 2),
            },
        )
        .unwrap();
        let sa = rng.mat(5, 3, 1.0);
        let sg = rng.mat(5, 2, 1.0);
        let (sa, sg) = (to_f32(&second_moment(&sa)), to_f32(&second_moment(&sg)));
        p.observe(
            self.ids[3],
            Observation::Kronecker {
                a: MatRef::from_row_major_slice(&sa, 3, 3),
                g: MatRef::from_row_major_slice(&sg, 2, 2),
                samples: 5,
            },
        )
        .unwrap();
    }

    /// One step with random gradients; returns the preconditioned values.
    fn step(&self, p: &mut Preconditioner, rng: &mut Rng) -> Vec<u32> {
        let mut w0 = to_f32(&rng.mat(3, 4, 1.0));
        let mut b0 = to_f32(&rng.mat(1, 3, 1.0));
        let mut w1 = to_f32(&rng.mat(2, 8, 1.0));
        let mut w2 = to_f32(&rng.mat(5, 2, 1.0));
        let mut w3 = to_f32(&rng.mat(2, 3, 1.0));
        p.step(&mut [
            LayerGrad::from_row_major(self.ids[0], &mut w0, 3, 4, Some(&mut b0)).unwrap(),
            LayerGrad::from_row_major(self.ids[1], &mut w1, 2, 8, None).unwrap(),
            LayerGrad::from_row_major(self.ids[2], &mut w2, 5, 2, None).unwrap(),
            LayerGrad::from_row_major(self.ids[3], &mut w3, 2, 3, None).unwrap(),
        ])
        .unwrap();
        [w0, b0, w1, w2, w3]
            .iter()
            .flatten()
            .map(|v| v.to_bits())
            .collect()
    }

    fn run(&self, p: &mut Preconditioner, rng: &mut Rng, steps: usize) -> Vec<Vec<u32>> {
        (0..steps)
            .map(|_| {
                if p.factor_update_due() {
                    self.observe(p, rng);
                }
                self.step(p, rng)
            })
            .collect()
    }
}

fn config(
    method: Method,
    compat: bool,
    precompute: bool,
    f32eig: bool,
    fsteps: u64,
    isteps: u64,
) -> Config {
    let base = if compat {
        Config::kfac_pytorch()
    } else {
        Config::default()
    };
    Config {
        method,
        precompute_denominators: precompute,
        eigen_precision: if f32eig {
            Precision::F32
        } else {
            Precision::F64
        },
        factor_update_steps: fsteps,
        inv_update_steps: isteps,
        // Kept bases must continue bitwise after a restore too.
        refresh_tolerance: if isteps % 2 == 1 { 0.05 } else { 0.0 },
        damping: Schedule::Piecewise {
            boundaries: vec![3],
            values: vec![0.1, 0.03],
        },
        kl_clip: Some(1e-2),
        threads: 1,
        exclude: vec![],
        compat: if compat {
            Compat::KfacPytorch
        } else {
            Compat::Native
        },
        ..base
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn restored_preconditioner_continues_bitwise_identically(
        seed in any::<u64>(),
        inverse_method in any::<bool>(),
        compat in any::<bool>(),
        precompute in any::<bool>(),
        f32eig in any::<bool>(),
        fsteps in 1u64..3,
        isteps in 1u64..4,
        before in 0usize..5,
        mid_step in any::<bool>(),
    ) {
        let method = if inverse_method { Method::Inverse } else { Method::Eigen };
        let cfg = config(method, compat, precompute, f32eig, fsteps, isteps);
        let mut p = Preconditioner::new(cfg).unwrap();
        let d = Driver::new(&mut p);
        let mut rng = Rng(seed);
        d.run(&mut p, &mut rng, before);
        if mid_step && p.factor_update_due() {
            // saved between observe and step: the accumulators travel too
            d.observe(&mut p, &mut rng);
        }
        let bytes = p.save();
        let mut q = Preconditioner::load(&bytes).unwrap();
        prop_assert_eq!(q.save(), bytes.clone());
        prop_assert_eq!(q.steps(), p.steps());
        let mut rq = Rng(rng.0);
        if mid_step && p.factor_update_due() {
            let a = d.step(&mut p, &mut rng);
            let b = d.step(&mut q, &mut rq);
            prop_assert_eq!(a, b);
        }
        let a = d.run(&mut p, &mut rng, 4);
        let b = d.run(&mut q, &mut rq, 4);
        prop_assert_eq!(a, b);
    }
}

fn sample() -> Vec<u8> {
    let mut p = Preconditioner::new(config(Method::Eigen, false, true, false, 1, 2)).unwrap();
    let d = Driver::new(&mut p);
    d.run(&mut p, &mut Rng(1), 2);
    p.save()
}

fn refused(bytes: &[u8]) -> String {
    match Preconditioner::load(bytes) {
        Err(Error::Checkpoint { reason }) => reason,
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(_) => panic!("a bad checkpoint was accepted"),
    }
}

#[test]
fn truncated_checkpoints_are_refused() {
    let b = sample();
    for len in [0, 7, 23, 24, 100, b.len() / 2, b.len() - 1] {
        let why = refused(&b[..len]);
        assert!(
            why.contains("truncated") || why.contains("length"),
            "{len}: {why}"
        );
    }
    let mut padded = b.clone();
    padded.push(0);
    assert!(refused(&padded).contains("length"));
}

#[test]
fn corrupted_payload_fails_the_checksum() {
    let b = sample();
    for pos in [24, 25, 100, b.len() / 2, b.len() - 1] {
        let mut c = b.clone();
        c[pos] ^= 0x40;
        assert!(refused(&c).contains("checksum"), "byte {pos}");
    }
}

#[test]
fn foreign_and_future_checkpoints_are_refused() {
    let b = sample();
    let mut c = b.clone();
    c[0..8].copy_from_slice(b"NOTKFAC!");
    assert!(refused(&c).contains("magic"));
    let mut c = b.clone();
    c[8..12].copy_from_slice(&(checkpoint::VERSION + 1).to_le_bytes());
    assert!(refused(&c).contains("version"));
}

#[test]
fn structurally_invalid_payload_with_valid_checksum_is_refused() {
    // Rewrite the payload's first byte (damping schedule tag) to an unknown
    // tag and fix the checksum: decoding must still refuse it.
    let b = sample();
    let mut payload = b[24..].to_vec();
    payload[0] = 9;
    let mut c = b[..20].to_vec();
    c.extend_from_slice(&crc32(&payload).to_le_bytes());
    c.extend_from_slice(&payload);
    assert!(refused(&c).contains("schedule"));
}

/// Bitwise CRC-32 (IEEE), independent of the crate's implementation.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn header_checksum_matches_an_independent_crc32() {
    let b = sample();
    let stored = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
    assert_eq!(stored, crc32(&b[24..]));
    assert_eq!(&b[0..8], checkpoint::MAGIC);
}
