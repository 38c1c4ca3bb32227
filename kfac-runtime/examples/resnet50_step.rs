//! One K-FAC step over every layer of ResNet-50 (53 convolutions and the
//! classifier: 108 factors), batch 32 at 224 x 224, random data, inverses
//! computed in the step, through the public API with the default
//! configuration (or the precision given: `f32`, `f64`, `auto`); prints
//! the stage times for 1 and 2 threads (or the thread counts given).
//!
//! ```text
//! cargo run --release -p kfac-runtime --example resnet50_step [f32|f64|auto] [threads...]
//! ```
//!
//! (Issue #12's measurements use these shapes; BENCHMARKS.md has a run.)

use std::time::Instant;

use kfac_kernels::conv::ImageLayout;
use kfac_runtime::{
    Config, Conv2dSpec, LayerGrad, LayerId, LayerKind, Observation, Precision, Preconditioner,
    Result,
};

const BATCH: usize = 32;

/// `(in, out, kernel, stride, padding, input side)` of a convolution.
type Conv = (usize, usize, usize, usize, usize, usize);

/// ResNet-50's convolutions in order (torchvision's v1.5: the stride of a
/// downsampling bottleneck is on its 3x3).
fn convs() -> Vec<Conv> {
    let mut v = vec![(3, 64, 7, 2, 3, 224)];
    let mut c_in = 64;
    for (stage, (width, blocks)) in [(64, 3), (128, 4), (256, 6), (512, 3)]
        .into_iter()
        .enumerate()
    {
        let out = width * 4;
        // Input side of the stage (after the stem's pooling: 56).
        let side_in = [56, 56, 28, 14][stage];
        let stride = if stage == 0 { 1 } else { 2 };
        let side_out = side_in / stride;
        for b in 0..blocks {
            let (cin, s, side) = if b == 0 {
                (c_in, stride, side_in)
            } else {
                (out, 1, side_out)
            };
            v.push((cin, width, 1, 1, 0, side));
            v.push((width, width, 3, s, 1, side));
            v.push((width, out, 1, 1, 0, side_out));
            if b == 0 {
                v.push((cin, out, 1, s, 0, side));
            }
        }
        c_in = out;
    }
    v
}

/// Deterministic data in [-1, 1).
fn fill(v: &mut [f32], seed: u64) {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for x in v.iter_mut() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        *x = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
    }
}

fn run(threads: usize, precision: Precision) -> Result<()> {
    let mut p = Preconditioner::new(Config {
        threads,
        inv_update_steps: 1,
        eigen_precision: precision,
        ..Config::default()
    })?;
    let convs = convs();
    let mut ids: Vec<(LayerId, usize, usize)> = Vec::new();
    for (k, &(cin, cout, ks, s, pad, _)) in convs.iter().enumerate() {
        let spec = Conv2dSpec {
            in_channels: cin,
            out_channels: cout,
            kernel: (ks, ks),
            stride: (s, s),
            padding: (pad, pad),
            dilation: (1, 1),
            bias: false,
            layout: ImageLayout::Nchw,
        };
        ids.push((
            p.register(&format!("conv{k}"), LayerKind::Conv2d(spec))?,
            cout,
            cin * ks * ks,
        ));
    }
    let fc = p.register(
        "fc",
        LayerKind::Linear {
            in_features: 2048,
            out_features: 1000,
            bias: true,
        },
    )?;
    let t0 = Instant::now();
    let (mut input, mut grads) = (Vec::new(), Vec::new());
    for (k, &(cin, cout, ks, s, pad, side)) in convs.iter().enumerate() {
        let out_side = (side + 2 * pad - ks) / s + 1;
        input.resize(BATCH * cin * side * side, 0.0);
        grads.resize(BATCH * cout * out_side * out_side, 0.0);
        fill(&mut input, 2 * k as u64 + 1);
        fill(&mut grads, 2 * k as u64 + 2);
        p.observe(
            ids[k].0,
            Observation::Conv2d {
                input: &input,
                output_grads: &grads,
                batch: BATCH,
                height: side,
                width: side,
            },
        )?;
    }
    let (mut x, mut g) = (vec![0.0f32; BATCH * 2048], vec![0.0f32; BATCH * 1000]);
    fill(&mut x, 1000);
    fill(&mut g, 1001);
    p.observe(
        fc,
        Observation::Linear {
            activations: faer::MatRef::from_row_major_slice(&x, BATCH, 2048),
            output_grads: faer::MatRef::from_row_major_slice(&g, BATCH, 1000),
        },
    )?;
    drop((input, grads));
    let mut ws: Vec<Vec<f32>> = ids
        .iter()
        .enumerate()
        .map(|(k, &(_, o, i))| {
            let mut w = vec![0.0; o * i];
            fill(&mut w, 5000 + k as u64);
            w
        })
        .collect();
    let mut wfc = vec![0.0f32; 1000 * 2048];
    let mut bfc = vec![0.0f32; 1000];
    fill(&mut wfc, 9000);
    fill(&mut bfc, 9001);
    let mut lg: Vec<LayerGrad<'_>> = Vec::new();
    for (w, &(id, o, i)) in ws.iter_mut().zip(&ids) {
        lg.push(LayerGrad::from_row_major(id, w, o, i, None)?);
    }
    lg.push(LayerGrad::from_row_major(
        fc,
        &mut wfc,
        1000,
        2048,
        Some(&mut bfc),
    )?);
    let st = p.step(&mut lg)?;
    let t = &st.times;
    println!(
        "| {threads} | {precision:?} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} |",
        t.factor_update.as_secs_f64(),
        t.inversion.as_secs_f64(),
        t.preconditioning.as_secs_f64(),
        t.total.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    let mut precision = Precision::Auto;
    let mut threads: Vec<usize> = Vec::new();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "f32" => precision = Precision::F32,
            "f64" => precision = Precision::F64,
            "auto" => precision = Precision::Auto,
            t => threads.push(t.parse().expect("thread counts are integers")),
        }
    }
    let threads = if threads.is_empty() {
        vec![1, 2]
    } else {
        threads
    };
    println!(
        "ResNet-50, batch {BATCH}, {} convolutions + fc, default config, inversion in the step",
        convs().len()
    );
    println!("| threads | precision | factors (s) | inversion (s) | preconditioning (s) | step total (s) | wall incl. data (s) |");
    println!("|---|---|---|---|---|---|---|");
    for t in threads {
        run(t, precision)?;
    }
    Ok(())
}
